"""Downloading PASCAL VOC (needs internet access; not available in every environment)."""

from __future__ import annotations

import os
import tarfile
import tempfile
import urllib.request

_MIRROR = "http://host.robots.ox.ac.uk/pascal/VOC"
VOC_DOWNLOADS = {
    "2007": [f"{_MIRROR}/voc2007/VOCtrainval_06-Nov-2007.tar", f"{_MIRROR}/voc2007/VOCtest_06-Nov-2007.tar"],
    "2012": [f"{_MIRROR}/voc2012/VOCtrainval_11-May-2012.tar"],
}


def download_voc(year: str, dest: str) -> str:
    """Download and unpack VOC ``year`` into ``dest/VOCdevkit/VOC<year>``; returns that folder.

    Raises RuntimeError naming the URL when a download fails. Archives are extracted with
    tarfile's ``data`` filter (no absolute paths, links or files outside ``dest``).
    """
    year = str(year)
    if year not in VOC_DOWNLOADS:
        raise RuntimeError(f"no download known for VOC{year} (known: {', '.join(VOC_DOWNLOADS)})")
    os.makedirs(dest, exist_ok=True)
    for url in VOC_DOWNLOADS[year]:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            archive = os.path.join(tmp, os.path.basename(url))
            try:
                print(f"downloading {url}", flush=True)
                urllib.request.urlretrieve(url, archive)
            except OSError as err:
                raise RuntimeError(f"cannot download {url}: {err}. Download it by hand and unpack it into {dest}") from err
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
    return os.path.join(dest, "VOCdevkit", f"VOC{year}")

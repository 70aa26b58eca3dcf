"""Where weights come from: one local weights directory, the Hugging Face Hub, then the URLs.

The authors' Dropbox links are dead for many users, who find copies elsewhere.
So every weight source in this repository (``released``, a ``zoo:<name>`` word in a
config, a URL, a timm ``pretrained=True``) is looked up in this order (a ``zoo:`` word
is its ``model_zoo.json`` entry's URL):

1. the **weights directory**, ``$MPVIT_WEIGHTS`` (default: torch's hub cache,
   ``~/.cache/torch/hub/checkpoints``), for the file's released name
   (``mpvit_small.pth``) or the same name as ``.safetensors`` (another URL's file is kept
   under a name prefixed with a hash of the URL); a damaged copy is passed over;
2. the Hub repository recorded for that checkpoint in ``model_zoo.json``
   (``hf_hub_id``), through the Hub's own cache (``HF_HUB_OFFLINE=1`` works);
3. the URL and its mirrors, downloaded into the weights directory atomically
   (a temporary name, then rename), checked against the announced size, for
   being a checkpoint at all and, where ``model_zoo.json`` records one, the
   sha256; the sha256 is printed so that copies can be compared.

When none has it, one error names every place that was tried.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mpvit import model_zoo
from mpvit.serialization import CheckpointError, check_container

__all__ = ['HUB_PREFIX', 'WEIGHTS_ENV', 'download', 'fetch', 'file_sha256', 'is_remote', 'is_url', 'local_names',
           'weights_dir']

WEIGHTS_ENV = 'MPVIT_WEIGHTS'
HUB_PREFIX = 'hf-hub:'
_CHUNK = 1 << 20


def weights_dir() -> Path:
    """``$MPVIT_WEIGHTS``, else torch's hub cache (where timm and torch.hub keep downloads too)."""
    configured = os.environ.get(WEIGHTS_ENV)
    if configured:
        return Path(configured).expanduser()
    import torch.hub

    return Path(torch.hub.get_dir()) / 'checkpoints'


def is_url(path_or_url: str) -> bool:
    return path_or_url.startswith(('http://', 'https://'))


def is_remote(source: str) -> bool:
    """Whether ``source`` names weights that :func:`fetch` finds or downloads (a URL, an ``hf-hub:`` id, a
    ``zoo:`` word) rather than a file to read where it is: loaders that hand files to another library
    (Detectron2's, mmengine's) must send these through :func:`fetch` first."""
    return is_url(source) or source.startswith(HUB_PREFIX) or model_zoo.is_zoo_name(source)


def _basename(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path)


def local_names(url: str) -> List[str]:
    """File names under which the weights directory may hold ``url``'s file. A released checkpoint's (from
    any of its URLs): its released name, and that name as ``.safetensors`` (what
    ``tools/convert_checkpoint.py`` writes). Any other URL's: its name prefixed with a hash of the URL, as
    two URLs may end in the same name (``model_final.pth``)."""
    entry = model_zoo.by_url(url)
    if entry is None:
        return [f'{hashlib.sha256(url.encode()).hexdigest()[:8]}-{_basename(url)}']
    name = _basename(entry.url)  # mirrors serve the same file: kept under the released name
    stem, ext = os.path.splitext(name)
    return [name] + ([stem + '.safetensors'] if ext != '.safetensors' else [])


_HASHED: Dict[str, Tuple[Tuple[int, int], str]] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (hex), remembered per file version (size and modification time)."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    version = (stat.st_size, stat.st_mtime_ns)
    cached = _HASHED.get(path)
    if cached and cached[0] == version:
        return cached[1]
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    _HASHED[path] = (version, digest.hexdigest())
    return digest.hexdigest()


def _check_sha256(path: str | os.PathLike, expected: Optional[str], origin: str) -> None:
    """Refuse a copy whose sha256 differs from the one ``model_zoo.json`` records (nothing when none is)."""
    if expected and file_sha256(path) != expected.lower():
        raise CheckpointError(f'{path} ({origin}) has sha256 {file_sha256(path)}, but model_zoo.json records '
                              f'{expected} for it: a different or damaged copy; remove it and fetch it again')


def _progress(total: Optional[int], name: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub, a timm dependency
        return None
    return tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr,
                disable=not sys.stderr.isatty())


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically; refuse a short read or a sha256 mismatch; print the sha256.

    The bytes go to a new temporary file in ``dest``'s folder (created exclusively, never through a
    link), which is renamed over ``dest`` only once complete and checked. Processes that download the
    same file at once (one per GPU) wait for the first through a lock file.
    """
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    locks = dest.parent / '.locks'
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / (dest.name + '.lock'))):
        if dest.is_file() and _usable(dest, sha256):  # another process finished it meanwhile
            return dest
        print(f'[mpvit] downloading {url} -> {dest}', file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
        digest, size = hashlib.sha256(), 0
        try:
            request = urllib.request.Request(url, headers={'User-Agent': 'mpvit'})
            with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                announced = response.headers.get('Content-Length')
                announced = int(announced) if announced and announced.isdigit() else None
                bar = _progress(announced, dest.name)
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
            if announced is not None and size != announced:
                raise CheckpointError(f'{url}: the download stopped after {size:,} of {announced:,} bytes; try again')
            got = digest.hexdigest()
            if sha256 and got != sha256.lower():
                raise CheckpointError(f'{url}: the downloaded file has sha256 {got}, but model_zoo.json records '
                                      f'{sha256}: not the released file; nothing was kept')
            try:  # a web page or a file cut short without a Content-Length is no checkpoint
                check_container(tmp, name=dest.name)
            except CheckpointError as e:
                raise CheckpointError(f'{url}: the download is no usable checkpoint '
                                      f'({str(e).removeprefix(tmp).strip()}); nothing was kept') from None
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _HASHED.pop(os.path.realpath(dest), None)
    print(f'[mpvit] saved {dest} ({size:,} bytes, sha256 {got})', file=sys.stderr, flush=True)
    return dest


def _usable(path: Path, sha256: Optional[str] = None) -> bool:
    try:
        check_container(str(path))
        return not sha256 or file_sha256(path) == sha256.lower()
    except (CheckpointError, OSError):
        return False


def _hub_download(repo_id: str, filename: Optional[str], revision: Optional[str] = None) -> str:
    """A file of a Hub repository through the Hub's cache; without a name, timm's ``model.safetensors``,
    else ``pytorch_model.bin``."""
    from huggingface_hub import hf_hub_download

    if filename:
        return hf_hub_download(repo_id, filename, revision=revision)
    try:
        return hf_hub_download(repo_id, 'model.safetensors', revision=revision)
    except Exception as first:  # noqa: BLE001 (the Hub raises many types; the fallback decides)
        try:
            return hf_hub_download(repo_id, 'pytorch_model.bin', revision=revision)
        except Exception:  # noqa: BLE001
            raise first from None


def _split_hub(source: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``hf-hub:org/name[@revision][/file]`` -> (repo id, file name or None, revision or None)."""
    parts = source[len(HUB_PREFIX):].split('/', 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f'{source}: expected {HUB_PREFIX}<org>/<name>[@<revision>][/<file>]')
    name, _, revision = parts[1].partition('@')
    return f'{parts[0]}/{name}', parts[2] if len(parts) == 3 else None, revision or None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f'HTTP Error {err.code} {err.reason}'
    reason = getattr(err, 'reason', None) or err
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(err).__name__


def fetch(source: str) -> str:
    """The local path of a weights ``source``: a file path, a URL, ``hf-hub:<org>/<name>[@<rev>][/<file>]``, or
    ``zoo:<name>`` (an entry of ``model_zoo.json``: the one place where its URLs are written).

    A URL is looked up as the module docstring says (weights directory, Hub id, URL and mirrors);
    a released checkpoint's extra sources come from ``model_zoo.json``.
    """
    if model_zoo.is_zoo_name(source):
        source = model_zoo.zoo_entry(source).url
    if source.startswith(HUB_PREFIX):
        repo_id, filename, revision = _split_hub(source)
        try:
            return _hub_download(repo_id, filename, revision)
        except Exception as e:  # noqa: BLE001 (the Hub raises many types; each is a place that failed)
            raise CheckpointError(f'cannot get {filename or "model.safetensors"} from the Hugging Face Hub '
                                  f'repository {repo_id} ({type(e).__name__}: {_reason(e)})') from None
    if not is_url(source):
        return os.path.expanduser(source)

    entry = model_zoo.by_url(source)
    urls = [source] + [u for u in (entry.sources if entry else []) if u != source]
    names = local_names(source)
    folder = weights_dir()
    tried = []
    for name in names:
        path = folder / name
        try:  # a damaged, unreadable or different copy is reported and passed over: the other sources serve
            if not path.is_file():
                continue
            check_container(str(path))
            if entry and name == _basename(entry.url):  # the released file itself, not a conversion
                _check_sha256(path, entry.sha256, f'the released {entry.name}')
        except (CheckpointError, OSError) as e:
            tried.append(f'{path}: {e}' if isinstance(e, OSError) else str(e))
            continue
        return str(path)
    if not tried:
        tried.append(f'{folder} (${WEIGHTS_ENV}) for {" or ".join(names)}: not there')
    if entry and entry.hf_hub_id:
        try:
            return _hub_download(entry.hf_hub_id, entry.hub_filename)
        except Exception as e:  # noqa: BLE001 (as above)
            tried.append(f'Hugging Face Hub {entry.hf_hub_id}/{entry.hub_filename}: {type(e).__name__}: {_reason(e)}')
    for url in urls:
        try:
            return str(download(url, folder / names[0], entry.sha256 if entry else None))
        except (OSError, urllib.error.URLError, http.client.HTTPException, CheckpointError, UnicodeError,
                ValueError) as e:
            # HTTP, socket and SSL errors, an unwritable folder, a short read, another sha256, a URL that
            # urllib cannot send: the next source
            tried.append(f'{url}: {_reason(e).removeprefix(url + ": ")}')
    what = entry.name if entry else _basename(source)
    raise CheckpointError(f'cannot find the weights {what}; tried ' + '; '.join(tried)
                          + f'. Copy the file into {folder} (or set ${WEIGHTS_ENV}), or pass its path instead')


"""The one reader/writer of hloc's files (the shape of hloc's ``utils/io.py`` + ``utils/parsers.py``).

Every stage that reads or writes these formats goes through here:

* **features** (``feats-*.h5``): one group per image name (nested groups when the name
  holds ``/``) with ``keypoints`` (N, 2) float32 in hloc's convention (origin at the
  *centre* of the top-left pixel: COLMAP coordinates minus 0.5; attribute
  ``uncertainty``), ``descriptors`` (D, N) -- transposed, as hloc stores them --,
  ``scores`` (N,), optionally ``scales``/``oris``, and ``image_size`` (2,) = (width,
  height) of the original image;
* **global features** (``global-feats-*.h5``): one group per image with
  ``global_descriptor`` (D,) and optionally ``image_size``;
* **matches** (``*matches*.h5``): one group per pair, keyed :func:`names_to_pair`
  (``"<name0>/<name1>"`` with ``/`` in the names replaced by ``-``), holding ``matches0``
  (N0,) int16 (-1 = unmatched; int32 when image 1 has more than 32767 keypoints) and
  ``matching_scores0`` (N0,) float16; readers accept either order and hloc's legacy ``_``
  separator (:func:`find_pair`);
* **pairs** (``pairs-*.txt``): one ``name0 name1`` per line, no trailing newline
  (blank lines and ``#`` comments are skipped on reading).

Writes of whole files are atomic (:mod:`tasks.common.atomic`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from tasks.common.atomic import atomic_h5, remove_partials, write_text_atomic

logger = logging.getLogger(__name__)


def unique_names(items: Iterable[str | Path]) -> list[str]:
    """Image names in first-seen order without repeats (``Path`` as POSIX strings)."""
    seen: set[str] = set()
    out = []
    for x in items:
        x = x.as_posix() if isinstance(x, Path) else str(x)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


# ----------------------------------------------------------------------------- h5 names


def list_h5_names(path: str | Path) -> list[str]:
    """Names of the groups that hold at least one dataset (hloc's ``list_h5_names``), sorted;
    ``[]`` for a missing file."""
    path = Path(path)
    if not path.exists():
        return []
    names: set[str] = set()
    with h5py.File(str(path), "r", libver="latest") as fd:

        def visit(_, obj):
            if isinstance(obj, h5py.Dataset):
                names.add(obj.parent.name.strip("/"))

        fd.visititems(visit)
    names.discard("")
    return sorted(names)


# ----------------------------------------------------------------------------- features


def write_features(fd: h5py.File, name: str, pred: Mapping[str, np.ndarray], uncertainty: float | None = None) -> None:
    """One image's features into an open features file (replacing an existing group)."""
    if name in fd:
        del fd[name]
    grp = fd.create_group(name)
    for k, v in pred.items():
        grp.create_dataset(k, data=v)
    if uncertainty is not None:
        grp["keypoints"].attrs["uncertainty"] = uncertainty


def read_keypoints(feature_path: str | Path, name: str, return_uncertainty: bool = False):
    """(N, 2) keypoints in hloc's convention (COLMAP minus 0.5), as stored."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        dset = fd[name]["keypoints"]
        kp = dset[()]
        unc = dset.attrs.get("uncertainty")
    return (kp, unc) if return_uncertainty else kp


def read_keypoints_colmap(fd: h5py.File, name: str, where: str | Path = "") -> np.ndarray:
    """(N, 2) float32 keypoints of ``name`` from an open features file in COLMAP's pixel
    convention (origin at the corner of the top-left pixel: hloc's + 0.5, as hloc imports
    them into a COLMAP database)."""
    if name not in fd:
        raise KeyError(f"{where or fd.filename}: no features for image {name}; rerun the feature stage")
    return np.asarray(fd[name]["keypoints"], dtype=np.float32).reshape(-1, 2) + 0.5


def read_descriptors(feature_path: str | Path, name: str) -> np.ndarray:
    """(D, N) descriptors, as stored (transposed, hloc's layout)."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        return fd[name]["descriptors"][()]


def iter_features(feature_path: str | Path, names: Iterable[str],
                  keys: Sequence[str] = ("descriptors",)) -> Iterable[tuple[str, dict[str, np.ndarray]]]:
    """(name, {key: array}) for each of ``names`` from one open features file; a key the
    image's group lacks (e.g. ``image_size`` of an older file) is left out."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        for n in names:
            if n not in fd:
                raise KeyError(f"{feature_path}: no features for image {n}; rerun the feature stage")
            grp = fd[n]
            yield n, {k: grp[k][()] for k in keys if k in grp}


def read_image_size(feature_path: str | Path, name: str) -> tuple[int, int]:
    """(width, height) of the original image."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        w, h = fd[name]["image_size"][()]
    return int(w), int(h)


def write_global(fd: h5py.File, name: str, descriptor: np.ndarray, image_size: np.ndarray | None = None) -> None:
    """One image's global descriptor into an open global-features file (replacing)."""
    if name in fd:
        del fd[name]
    grp = fd.create_group(name)
    grp.create_dataset("global_descriptor", data=descriptor)
    if image_size is not None:
        grp.create_dataset("image_size", data=image_size)


def read_global_descriptors(paths: Sequence[str | Path], names: Sequence[str],
                            key: str = "global_descriptor") -> np.ndarray:
    """(len(names), D) float32 global descriptors, each from the first of ``paths`` holding it."""
    handles = [h5py.File(str(p), "r", libver="latest") for p in paths]
    try:
        out = []
        for n in names:
            for h in handles:
                if n in h and key in h[n]:
                    out.append(np.asarray(h[n][key][()], dtype=np.float32).ravel())
                    break
            else:
                raise KeyError(f"{n}: no {key} in {[str(p) for p in paths]}")
        return np.stack(out) if out else np.zeros((0, 0), np.float32)
    finally:
        for h in handles:
            h.close()


# ----------------------------------------------------------------------------- matches


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's pair key: the two names with '/' replaced by '-', joined by ``separator``."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def names_to_pair_old(name0: str, name1: str) -> str:
    """hloc's legacy pair key (``_`` separator)."""
    return names_to_pair(name0, name1, separator="_")


def pair_keys(name0: str, name1: str) -> tuple[tuple[str, bool], ...]:
    """Every key a pair may be stored under, with whether it is reversed, in hloc's order."""
    return ((names_to_pair(name0, name1), False), (names_to_pair(name1, name0), True),
            (names_to_pair_old(name0, name1), False), (names_to_pair_old(name1, name0), True))


def pair_equivalents(key: str) -> tuple[str, ...]:
    """A ``/``-joined pair key and its reverse (the same pair in a matches file)."""
    a, sep, b = key.partition("/")
    return (key, f"{b}/{a}") if sep else (key,)


def find_pair(hfile: h5py.File | h5py.Group, name0: str, name1: str) -> tuple[str, bool]:
    """(key, reversed) of the pair in an open matches file, as hloc's ``find_pair``:
    tries (0, 1), (1, 0), then the legacy '_' keys in both orders."""
    for key, rev in pair_keys(name0, name1):
        if key in hfile:
            return key, rev
    raise ValueError(f"Could not find pair {(name0, name1)}... Maybe you matched with a different list of pairs? ")


def write_match(fd: h5py.File, key: str, matches0: np.ndarray, scores0: np.ndarray, n1: int) -> None:
    """One pair's matches into an open matches file (replacing): int16 indices unless
    image 1 has more keypoints than int16 holds, float16 scores (as hloc)."""
    if key in fd:
        del fd[key]
    grp = fd.create_group(key)
    dtype = np.int16 if n1 <= np.iinfo(np.int16).max else np.int32
    grp.create_dataset("matches0", data=np.asarray(matches0).astype(dtype))
    grp.create_dataset("matching_scores0", data=np.asarray(scores0).astype(np.float16))


def read_matches(match_path: str | Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """hloc's ``get_matches``: (M, 2) int64 indices (into name0's, name1's keypoints) and
    (M,) scores."""
    with h5py.File(str(match_path), "r", libver="latest") as fd:
        pair, reverse = find_pair(fd, name0, name1)
        matches = fd[pair]["matches0"][()]
        scores = fd[pair]["matching_scores0"][()]
    idx = np.where(matches != -1)[0]
    out = np.stack([idx, matches[idx].astype(np.int64)], -1)
    if reverse:
        out = np.flip(out, -1)
    return np.ascontiguousarray(out, dtype=np.int64).reshape(-1, 2), scores[idx]


def pairs_present(paths: Sequence[str | Path], pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The pairs (as given) stored in any of the matches files ``paths``, in either order."""
    files = [Path(p) for p in paths if Path(p).exists()]
    if not files:
        return set()
    handles = [h5py.File(str(p), "r", libver="latest") for p in files]
    try:
        return {(i, j) for i, j in pairs if any(k in h for h in handles for k, _ in pair_keys(i, j))}
    finally:
        for h in handles:
            h.close()


# ----------------------------------------------------------------------------- pair files


def write_pairs(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write "name0 name1" lines (hloc's format, no trailing newline), atomically."""
    lines = []
    for a, b in pairs:
        if any(c.isspace() for c in a + b):
            raise ValueError(f"image names with whitespace cannot go in a pairs file: {(a, b)}")
        lines.append(f"{a} {b}")
    return write_text_atomic(path, "\n".join(lines))


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Pairs from a pairs file (blank lines and '#' comments skipped), in file order."""
    pairs = []
    with open(path) as f:
        for k, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}: line {k}: expected 'name0 name1', got {line[:80]!r}; "
                                 "rerun the pairs stage")
            pairs.append((parts[0], parts[1]))
    return pairs


def write_pairs_if_changed(path: str | Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """Keep an identical pair file untouched (later stages fingerprint their inputs)."""
    path = Path(path)
    if path.exists() and read_pairs(path) == list(pairs):
        return path
    return write_pairs(path, pairs)


# ----------------------------------------------------------------------------- resumable writers
#
# A stage writing a keyed h5 file (features, matches) commits its work in chunk files
# ``.<file>.chunk-<digest>.h5`` merged at the end, so an interrupted run loses at most one
# chunk and a rerun picks the chunks up; a fan-out over workers writes one part file per
# worker (``<stem>.part-<i>-of-<n><suffix>``) merged by :func:`merge_h5`.


def _copy_group(src: h5py.File, dst: h5py.File, name: str) -> None:
    parent, _, leaf = name.rpartition("/")
    target = dst.require_group(parent) if parent else dst
    src.copy(src[name], target, name=leaf)


def merge_h5(parts: Sequence[str | Path], dest: str | Path, overwrite: bool = False, remove_parts: bool = False,
             equivalents: Callable[[str], Iterable[str]] | None = None) -> Path:
    """Merge the keyed groups of ``parts`` into ``dest``, atomically and idempotently.

    Keys already in ``dest`` (or any of ``equivalents(key)``) are kept unless
    ``overwrite``; among parts the first holding a key wins. Nothing is written
    when there is nothing new. Root attributes of parts are added where ``dest``
    lacks them. ``remove_parts`` deletes the part files after a successful merge.
    """
    dest = Path(dest)
    parts = [Path(p) for p in parts if Path(p).exists() and Path(p).resolve() != dest.resolve()]
    existing = set(list_h5_names(dest))
    equiv = equivalents or (lambda k: (k,))
    taken: set[str] = set()
    plan: list[tuple[Path, str]] = []
    for part in parts:
        for key in list_h5_names(part):
            alts = set(equiv(key)) | {key}
            if alts & taken:
                continue
            if not overwrite and alts & existing:
                continue
            plan.append((part, key))
            taken |= alts
    if plan:
        replaced = set()
        if overwrite:
            for _, key in plan:
                replaced |= (set(equiv(key)) | {key}) & existing
        base = dest if dest.exists() and not replaced else None
        with atomic_h5(dest, base=base) as out:
            if base is None and dest.exists():
                with h5py.File(str(dest), "r", libver="latest") as old:
                    for k, v in old.attrs.items():
                        out.attrs[k] = v
                    for key in sorted(existing - replaced):
                        _copy_group(old, out, key)
            by_part: dict[Path, list[str]] = {}
            for part, key in plan:
                by_part.setdefault(part, []).append(key)
            for part, keys in by_part.items():
                with h5py.File(str(part), "r", libver="latest") as src:
                    for k, v in src.attrs.items():
                        if k not in out.attrs:
                            out.attrs[k] = v
                    for key in keys:
                        _copy_group(src, out, key)
        logger.info("merged %d entries from %d part(s) into %s", len(plan), len(parts), dest)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    return dest


def ensure_h5(path: str | Path) -> Path:
    """Create an empty HDF5 file at ``path`` (atomically) when there is none."""
    path = Path(path)
    if not path.exists():
        with atomic_h5(path):
            pass
    return path


def chunk_glob(path: str | Path) -> list[Path]:
    """Leftover chunk files of an interrupted run writing ``path``."""
    path = Path(path)
    if not path.parent.exists():
        return []
    return sorted(path.parent.glob(f".{path.name}.chunk-*.h5"))


def resume_chunks(path: str | Path, overwrite: bool) -> list[Path]:
    """Start a resumable writer of ``path``: remove the temporary files killed writers of
    ``path`` or of its chunks left, then return the chunk files a previous run finished
    (to reuse; deleted instead when ``overwrite``)."""
    path = Path(path)
    remove_partials(path.parent, path.name)
    remove_partials(path.parent, f".{path.name}.chunk-*")
    leftovers = chunk_glob(path)
    if overwrite:
        for p in leftovers:
            p.unlink(missing_ok=True)
        return []
    return leftovers


def chunk_path(path: str | Path, keys: Sequence[str]) -> Path:
    path = Path(path)
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    return path.with_name(f".{path.name}.chunk-{digest}.h5")


def part_paths(path: str | Path, n_parts: int) -> list[Path]:
    """The part files of a fan-out over ``n_parts`` workers writing ``path``."""
    path = Path(path)
    return [path.with_name(f"{path.stem}.part-{i:03d}-of-{n_parts:03d}{path.suffix}") for i in range(n_parts)]


def split_even(items: Sequence, n_parts: int) -> list[list]:
    """Split ``items`` into ``n_parts`` contiguous, nearly equal blocks (deterministic)."""
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    bounds = np.linspace(0, len(items), n_parts + 1).round().astype(int)
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(n_parts)]

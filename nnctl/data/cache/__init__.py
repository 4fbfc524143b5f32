"""The decoded-image cache: an image folder decoded and resized once, then read at memory speed.

``data.cache: true`` (source ``image_folder`` only; default false, since the cache writes to
disk outside the run folder) keeps every image of the folder, decoded to uint8 and resized
as nnctl decodes it without the cache, in one raw file that later runs and later epochs
memory-map instead of decoding again. The page cache and ``np.memmap`` do the rest, so a
folder larger than memory works too (it is read from disk, not decoded).

Where: ``$NNCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/nnctl/decoded`` (``~/.cache/nnctl/decoded``).
One entry per key, the sha256 of: the format version, the folder's absolute path, every
file in the store's order with its size, modification time (ns), change time (ctime, ns),
inode and class index, the colour mode, the target size (or "native"), the resize method
and the decoder's version. A file added, removed, renamed or changed changes the key, so a
stale entry is simply never found; ``nnctl cache clear`` frees it. The ctime catches a
change that keeps the size and restores the mtime (``cp -p``, ``rsync -a``, ``tar x``): the
kernel sets it on every write and metadata change, and no call sets it back. A fill decodes
only once the clock is past the newest ctime by ``entry.SETTLE_NS`` (``entry.settle``), so
a write in the same clock tick as the previous change is caught too. What is not detected
(a clock set back, writes beneath the filesystem, filesystems without a ctime) is in the
README (data.cache).

An entry is two files:

* ``<key>.u8``: the samples, N x C x H x W uint8, C order, no header (``np.memmap`` or
  ``torch.from_file`` read it directly);
* ``<key>.json``: the header (shape, the folder, counts, when it was made, the sha256 of
  every 16 MiB chunk of the data, and the data file's (size, mtime_ns, ctime_ns, inode) when it was
  completed). Its mtime is the entry's "last used" time.

Writing: under an exclusive lock (``nnctl.locks``, an flock) on ``<key>.lock``, the images are decoded in
parallel (DataLoader workers, one per core) into ``<key>.u8.tmp-<pid>-<random>``, which is
fsynced and renamed to ``<key>.u8``; the header is written last (``files.atomic_write``), so
its presence marks a complete entry. Several processes (DDP ranks, two runs at once) all
take the lock in turn: the first builds, the others wait and then use its result. A process
killed mid-fill leaves only a temporary file, removed by the next builder of that key
(which holds the lock, so no live writer owns it) or by ``nnctl cache clear``.

Reading (no lock: a complete header means a complete entry; a rebuild renames new files
into place, so a mapping already open keeps its own copy): the header is parsed and
checked, the data file's size must match, and its chunks are hashed (two threads; sha256
runs at about 1.2 GB/s a core) against the header, in full when the data is at most
``FULL_VERIFY_BYTES`` (2 GiB: ~25 ms for 60 MB), otherwise when its (size, mtime, ctime, inode)
changed since it was written, or else a sample of 8 chunks (first, last and 6 spread
between). A corrupt, truncated or unreadable entry is never used: the run prints
``note: decoded cache <file> was corrupt (<why>): rebuilt`` and builds it again.

Decoding is the same function as without the cache (``nnctl.data.decode.decode_image``, the
one decoder: PIL, bilinear resize), so a cache hit gives exactly the batches of a fresh decode.
The key holds ``decode.DECODER`` (nnctl's decoder version and PIL's), so an entry written by
an older decoder is rebuilt, never reused. torchvision's
``decode_image`` + ``resize(antialias=True)`` gives the same pixels on this build but was no
faster for small images on the CPU (3,700 against 4,000 files/s a core for 32x32 and 96x96
PNG/JPEG), so the decoder is unchanged; the speed comes from decoding once, in parallel.

Progress: ``progress_to(callback)`` makes every fill in its scope call ``callback(done,
total)`` (the CLI renders a bar with files/s). Nothing here prints; the run's notes (a
built, rebuilt or unusable cache) are appended to the ``notes`` list the caller passes.
"""

from __future__ import annotations

from nnctl.data.cache.admin import Cleared, Entry, clear, entries
from nnctl.data.cache.entry import FORMAT, cache_dir, make_key
from nnctl.data.cache.fill import attach, progress_to

__all__ = ["FORMAT", "Cleared", "Entry", "attach", "cache_dir", "clear", "entries", "make_key", "progress_to"]
# the tunables (CHUNK_BYTES, FULL_VERIFY_BYTES, SAMPLED_CHUNKS, PARALLEL_FROM, BATCH) live in
# nnctl.data.cache.entry, where the code reads them: set them there

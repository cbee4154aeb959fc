"""Rebuild the malformed-shard corpus in this folder, byte for byte:

    python tests/corpus/shards/make_corpus.py            # (re)write the files
    python tests/corpus/shards/make_corpus.py --check    # exit 1 if a file differs

Every byte is made here by hand (tar headers via tarfile.TarInfo.tobuf, PNG and gzip with a
small fixed-Huffman deflate encoder, one JPEG kept as base64), never by PIL's encoders or
zlib's compressor, whose output may change with their versions: the committed files must
stay what this script writes. tests/test_data_integrity_corpus.py checks that they do, and
runs every case through the training stream, the evaluation reader and `data inspect`.

Cases (file: what is wrong). Files ending .tar/.tar.gz/.tgz are one shard each; folders hold
an index.json (and shards) for the index cases.
"""

from __future__ import annotations

import base64
import struct
import sys
import tarfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV_MARKER = "DINO_CORPUS_UNPICKLED"  # the pickles write this file if ever unpickled

# A 16x16 RGB JPEG (made once with PIL, quality 85), kept as bytes so it never changes.
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAUDBAQEAwUEBAQFBQUGBwwIBwcHBw8LCwkMEQ8SEhEPERETFhwXExQaFR"
    "ERGCEYGh0dHx8fExciJCIeJBweHx7/2wBDAQUFBQcGBw4ICA4eFBEUHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4e"
    "Hh4eHh4eHh4eHh4eHh4eHh4eHh4eHh7/wAARCAAQABADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQF"
    "BgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcY"
    "GRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWm"
    "p6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAA"
    "AAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAV"
    "YnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOU"
    "lZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIR"
    "AxEAPwDwzw74Q+7+6/SvSfDnhD7v7r9K7vw54Q+7+6/SvSfDvhD7v7r9KMNiQ4K41+H3j//Z"
)


# ---------------------------------------------------------------------------- deflate, PNG


class _Bits:
    def __init__(self) -> None:
        self.value, self.count = 0, 0

    def put(self, value: int, n: int) -> None:  # LSB first, as deflate packs fields
        self.value |= value << self.count
        self.count += n

    def code(self, code: int, n: int) -> None:  # Huffman codes go MSB first
        self.put(int(f"{code:0{n}b}"[::-1], 2), n)

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.count + 7) // 8, "little")


def _literal(bits: _Bits, byte: int) -> None:
    if byte < 144:
        bits.code(0x30 + byte, 8)
    else:
        bits.code(0x190 + byte - 144, 9)


def deflate(data: bytes) -> bytes:
    """Raw deflate, one fixed-Huffman block: literals, and runs as (258, distance 1) matches
    (code 285, distance code 0). Enough to make a long run of zeros tiny."""
    bits = _Bits()
    bits.put(1, 1)  # BFINAL
    bits.put(1, 2)  # BTYPE = fixed Huffman
    i = 0
    while i < len(data):
        if i and data[i - 1 : i + 258] == bytes([data[i - 1]]) * 259:
            bits.code(0xC5, 8)  # length code 285 = 258, no extra bits
            bits.code(0, 5)  # distance code 0 = 1
            i += 258
        else:
            _literal(bits, data[i])
            i += 1
    bits.code(0, 7)  # end of block (256)
    return bits.bytes()


def gzip_bytes(data: bytes) -> bytes:
    header = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x00\xff"  # mtime 0, OS unknown
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return header + deflate(data) + trailer


def png(width: int, height: int, seed: int, *, rows: int | None = None) -> bytes:
    """An 8-bit RGB PNG; `rows` < height writes pixel data for that many rows only (a header
    that claims more than the file holds, as a decompression bomb does)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = b"".join(
        b"\x00"
        + bytes((seed * 37 + x * 11 + y * 5 + c * 60) % 256 for x in range(width) for c in range(3))
        for y in range(height if rows is None else rows)
    )
    idat = b"\x78\x01" + deflate(raw) + struct.pack(">I", zlib.adler32(raw))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff() -> bytes:
    """A 1x1 grey uncompressed TIFF (little-endian, one IFD)."""
    data_at = 8 + 2 + 9 * 12 + 4  # after the header, the 9-entry IFD and its next-IFD link
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, data_at), (277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]  # fmt: skip
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", tag, kind, n, value) for tag, kind, n, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\x80"


def jpeg_claiming(width: int, height: int) -> bytes:
    """The JPEG with its frame header saying width x height."""
    sof = JPEG.index(b"\xff\xc0")
    return JPEG[: sof + 5] + struct.pack(">HH", height, width) + JPEG[sof + 9 :]


def pickle_payload() -> bytes:
    """A protocol-0 pickle that, if ever unpickled, writes the file $DINO_CORPUS_UNPICKLED."""
    code = (
        "import os, pathlib; p = os.environ.get('DINO_CORPUS_UNPICKLED'); "
        "p and pathlib.Path(p).write_text('unpickled')"
    )
    return b"cbuiltins\nexec\n(V" + code.encode() + b"\ntR."


# ---------------------------------------------------------------------------- tar


def _info(
    name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info


def member(name: str, data: bytes) -> bytes:
    header = _info(name, len(data)).tobuf(tarfile.USTAR_FORMAT)
    return header + data + bytes(-len(data) % 512)


def special(name: str, kind: bytes, link: str = "") -> bytes:
    info = _info(name, 0, kind, link)
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info.tobuf(tarfile.USTAR_FORMAT)


END = bytes(1024)  # two zero blocks: the end-of-archive marker


def tar(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(parts) + (END if end else b"")


def sample(key: str, seed: int, label: bytes | None = b"1") -> bytes:
    out = member(f"{key}.png", png(8, 6, seed))
    return out + (member(f"{key}.cls", label) if label is not None else b"")


def good(prefix: str, n: int) -> bytes:
    return b"".join(sample(f"{prefix}{i:02d}", i, str(i % 5).encode()) for i in range(n))


# ---------------------------------------------------------------------------- the cases


def _cut_cases() -> dict[str, bytes]:
    parts = [sample(f"cut{i:02d}", i, str(i).encode()) for i in range(4)]
    whole = tar(*parts)
    third = len(parts[0]) + len(parts[1])  # where cut02.png's header starts
    lie = png(8, 6, 9)
    return {
        # complete members, the end-of-archive blocks missing
        "truncated-no-end.tar": whole[: -len(END)],
        # cut inside the data of cut02.png
        "cut-mid-member.tar": whole[: third + 512 + 100],
        # cut inside the header of cut02.png
        "cut-in-header.tar": whole[: third + 200],
        # a header claiming 4 blocks of data where 1 follows: the next "header" tarfile reads
        # is a data block, and the rest of the archive is lost
        "member-size-lies.tar": good("ok", 2)
        + _info("liar.png", 2000).tobuf(tarfile.USTAR_FORMAT)
        + lie
        + bytes(-len(lie) % 512)
        + good("after", 1)
        + END,
        # a header with a wrong checksum between good samples
        "corrupt-header.tar": good("ok", 2)
        + bytes(b ^ 0x55 if 140 <= i < 150 else b for i, b in enumerate(member("bad.png", lie)))
        + good("after", 1)
        + END,
    }


def _member_cases() -> dict[str, bytes]:
    pickle = pickle_payload()
    return {
        "links.tar": tar(
            special("evil.png", tarfile.SYMTYPE, "/etc/passwd"),
            special("hard.png", tarfile.LNKTYPE, "ok00.png"),
            good("ok", 2),
        ),
        "devices.tar": tar(
            special("chr.png", tarfile.CHRTYPE),
            special("blk.png", tarfile.BLKTYPE),
            special("fifo.png", tarfile.FIFOTYPE),
            good("ok", 2),
        ),
        "escaping-names.tar": tar(
            member("/etc/abs.png", png(8, 6, 1)),
            member("../up.png", png(8, 6, 2)),
            member("a/../../b.png", png(8, 6, 3)),
            good("ok", 2),
        ),
        # pickles beside good images: never read, never unpickled
        "pickle-members.tar": tar(
            sample("p00", 1),
            member("p00.pth", pickle),
            member("p00.pyd", pickle),
            member("p01.pickle", pickle),
            member("p01.png", png(8, 6, 4)),
        ),
        "only-non-images.tar": tar(
            member("n00.json", b'{"a": 1}'), member("n01.txt", b"hello"), member("n02.pth", pickle)
        ),
        "empty.tar": END,
        "zero-bytes.tar": b"",
    }


def _image_cases() -> dict[str, bytes]:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto\nshowpage\n"
    return {
        # 100000 x 100000 pixels claimed by a 1 KB PNG: refused from its header
        "bomb-png.tar": tar(member("bomb.png", png(100_000, 100_000, 1, rows=0)), good("ok", 1)),
        "huge-dims-jpeg.tar": tar(member("huge.jpg", jpeg_claiming(65_000, 65_000)), good("ok", 1)),
        "truncated-jpeg.tar": tar(member("cut.jpg", JPEG[: len(JPEG) // 2]), good("ok", 1)),
        "not-an-image.tar": tar(member("text.jpg", b"this is not an image\n" * 4), good("ok", 1)),
        "eps-as-jpg.tar": tar(member("eps.jpg", eps), good("ok", 1)),
        "tiff-as-jpg.tar": tar(member("tiff.jpg", tiff()), good("ok", 1)),
    }


BAD_LABELS = {
    "l00": b"99999999999999999999",  # beyond int64
    "l01": b"-3",
    "l02": b"abc",
    "l03": "\uff15".encode(),  # a fullwidth digit five: not ASCII
    "l04": b"1" * 40,  # too long
    "l05": b"+5",
    "l06": b"1_0",
    "l07": b"",
}


def _label_and_key_cases() -> dict[str, bytes]:
    labels = b"".join(sample(key, i, label) for i, (key, label) in enumerate(BAD_LABELS.items()))
    return {
        "bad-labels.tar": tar(labels, sample("l08", 8, b" 7\n")),  # the last one is fine
        "duplicate-keys.tar": tar(
            sample("d00", 0),
            sample("d01", 1),
            sample("d00", 2),  # d00 again after d01
            sample("d02", 3),
            sample("d02", 4),  # d02 twice in a row, the same member names
            member("d03.png", png(8, 6, 5)),
            member("d04.png", png(8, 6, 6)),
            member("d03.cls", b"3"),  # d03's label split off by d04
        ),
    }


def _gzip_cases() -> dict[str, bytes]:
    ok = gzip_bytes(tar(good("gz", 3)))
    bomb = tar(
        member("big.png", bytes(1 << 20)),  # 1 MiB of zeros, a few KB compressed
        member("bomb.png", png(100_000, 100_000, 1, rows=0)),
        good("ok", 1),
    )
    return {
        "gzip-ok.tgz": ok,
        "bomb-member.tar.gz": gzip_bytes(bomb),
        "truncated.tar.gz": gzip_bytes(tar(good("gz", 6)))[:-900],
        "corrupt.tar.gz": ok[:10] + bytes(b ^ 0xA5 for b in ok[10:40]) + ok[40:],
    }


def _index(shards: list[tuple[str, int]]) -> bytes:
    entries = ",".join(f'{{"name": "{name}", "samples": {n}}}' for name, n in shards)
    return f'{{"version": 1, "shards": [{entries}]}}\n'.encode()


def _index_cases() -> dict[str, bytes]:
    many = _index([(f"missing-{i:05d}.tar", 10) for i in range(400)] + [("good.tar", 2)])
    return {
        # 2 samples in a.tar, the index says 6; b.tar holds 3, the index says 1
        "index-lies/index.json": _index([("a.tar", 6), ("b.tar", 1)]),
        "index-lies/a.tar": tar(good("a", 2)),
        "index-lies/b.tar": tar(good("b", 3)),
        "index-escape/index.json": _index([("good.tar", 2), ("../outside.tar", 1)]),
        "index-escape/good.tar": tar(good("g", 2)),
        "index-huge-count/index.json": _index([("good.tar", 10**30)]),
        "index-huge-count/good.tar": tar(good("g", 2)),
        "index-huge/index.json": many,  # over the size bound the test sets
        "index-huge/good.tar": tar(good("g", 2)),
        "index-not-json/index.json": b'{"shards": [{"name": "good.tar", "samples": 2}',
        "index-not-json/good.tar": tar(good("g", 2)),
        "index-xz/index.json": _index([("good.tar", 2), ("more.tar.xz", 5)]),
        "index-xz/good.tar": tar(good("g", 2)),
    }


def build() -> dict[str, bytes]:
    """Every corpus file: path relative to this folder -> bytes."""
    out: dict[str, bytes] = {}
    for part in (_cut_cases, _member_cases, _image_cases, _label_and_key_cases, _gzip_cases,
                 _index_cases):  # fmt: skip
        out.update(part())
    return out


def main(argv: list[str]) -> int:
    files = build()
    if "--check" in argv:
        stale = [
            n for n, d in files.items() if not (HERE / n).is_file() or (HERE / n).read_bytes() != d
        ]
        print("\n".join(stale) or "corpus up to date")
        return 1 if stale else 0
    for name, data in files.items():
        (HERE / name).parent.mkdir(parents=True, exist_ok=True)
        (HERE / name).write_bytes(data)
    print(f"wrote {len(files)} files under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

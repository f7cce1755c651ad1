"""What ``convert`` (and ``synth``) refuse to do, and what a converted dataset promises about itself.

* a finished dataset of other inputs or options is not replaced without ``--overwrite``, and ``--overwrite`` only
  replaces a multiembed dataset;
* the split (which row lands in which split) has an identity (:func:`multiembed.data.metadata.split_identity`);
* input fingerprints are size + mtime + a full content hash;
* one job per output directory (:mod:`multiembed.runtime.locking`), tested with a second process;
* no write or delete through a symbolic link inside ``--out``;
* one input given twice through a hard link, and non-regular inputs (FIFOs), are refused;
* a UTF-8 byte-order mark is stripped before parsing; quoted CSV fields are unquoted;
* a ``--vocab-from`` dataset can itself be a ``--vocab-from`` source;
* metadata names files relative to the dataset directory: a moved dataset still loads.

Every refusal is one stderr line ``multiembed <cmd>: error: ...`` and exit status 2.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multiembed.cli import main
from multiembed.data import metadata as metadata_module
from multiembed.data.metadata import read_metadata

REPO = Path(__file__).resolve().parents[1]

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def criteo_line(i: int, label: str = "0") -> str:
    ints = [str((i * 7 + k) % 50 - 3) if (i + k) % 5 else "" for k in range(13)]
    cats = ["%08x" % ((i * 31 + k * 17) % 97) if (i + k) % 9 else "" for k in range(26)]
    return "\t".join([label] + ints + cats)


def write(path: Path, lines: Sequence[str], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(line + "\n" for line in lines).encode())
    return path


def good_criteo(path: Path, rows: int = 40, offset: int = 0) -> Path:
    return write(path, [criteo_line(i + offset, str(i % 2)) for i in range(rows)])


def run_cli(capsys, *args: str):
    try:
        status = main(list(args))
    except SystemExit as e:  # argparse's own errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str, command: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"multiembed {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def convert_args(dataset: str, inputs: Sequence[Path], out: Path, *extra: str) -> List[str]:
    return ["convert", dataset, *map(str, inputs), "--out", str(out), "--quiet", *extra]


def tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes (links not followed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.is_symlink()}


def strings_in(obj) -> List[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings_in(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings_in(v)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# 1. a finished dataset of other inputs or options is not replaced; split identity


def test_other_seed_into_a_finished_dataset_is_refused(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    assert run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))[0] == 0
    before = tree(out)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64", "--seed", "1"))
    assert status == 2
    one_line_error(err, "convert", str(out), "seed", "--overwrite")
    assert tree(out) == before
    # the same inputs and options: a no-op, as before
    status, stdout, _ = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))
    assert status == 0 and "already converted" in stdout and tree(out) == before
    # --overwrite replaces it
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64", "--seed", "1",
                                                   "--overwrite"))
    assert status == 0, err
    meta = read_metadata(out)
    assert meta.options["seed"] == 1 and meta.split_recipe["seed"] == 1


def test_other_inputs_into_a_finished_dataset_are_refused(tmp_path, capsys):
    a = good_criteo(tmp_path / "day_0")
    b = good_criteo(tmp_path / "day_1", offset=100)
    out = tmp_path / "out"
    assert run_cli(capsys, *convert_args("criteo-1tb", [a], out, "--hash-size", "64"))[0] == 0
    before = tree(out)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [b], out, "--hash-size", "64"))
    assert status == 2
    one_line_error(err, "convert", str(out), "other inputs", str(b), "--overwrite")
    assert tree(out) == before
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [a, b], out, "--hash-size", "64"))
    assert status == 2
    one_line_error(err, "convert", "other inputs")
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [a], out, "--hash-size", "32"))
    assert status == 2
    one_line_error(err, "convert", "other options", "hash_sizes")
    assert tree(out) == before


def test_overwrite_only_replaces_a_multiembed_dataset(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / ".convert").mkdir()  # looks like a conversion in progress, but holds a file convert does not write
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "8", "--overwrite"))
    assert status == 2
    one_line_error(err, "convert", str(out))
    assert (out / "notes.txt").read_text() == "precious"
    # into a new directory --overwrite has nothing to replace: it converts
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], tmp_path / "new", "--hash-size", "8",
                                                   "--overwrite"))
    assert status == 0, err


def test_overwrite_replaces_a_synthetic_dataset_only_when_asked(tmp_path, capsys):
    from multiembed.data.synthetic import SyntheticConfig, generate_dataset

    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "synth"
    generate_dataset(out, 300, SyntheticConfig(seed=0), progress=False)
    before = tree(out)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "8"))
    assert status == 2
    one_line_error(err, "convert", str(out), "--overwrite")
    assert tree(out) == before
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "8", "--overwrite"))
    assert status == 0, err
    meta = read_metadata(out)
    assert meta.dataset == "criteo-1tb" and sum(meta.split_rows().values()) == 40
    listed = {f for s in meta.splits.values() for f in s.files}
    assert {p for p in tree(out) if p.endswith(".parquet")} == listed


def test_split_identity_follows_what_decides_the_split(tmp_path, capsys):
    a = good_criteo(tmp_path / "day_0")
    b = good_criteo(tmp_path / "day_1", offset=100)

    def identity(name: str, inputs, *extra: str) -> str:
        status, _, err = run_cli(capsys, *convert_args("criteo-1tb", inputs, tmp_path / name, *extra))
        assert status == 0, err
        value = metadata_module.split_identity(read_metadata(tmp_path / name))
        assert isinstance(value, str) and len(value) == 64
        return value

    base = identity("base", [a], "--hash-size", "64")
    # the vocabulary and the Parquet layout do not move a row to another split
    assert identity("layout", [a], "--hash-size", "32", "--compression", "zstd", "--row-group-size", "7") == base
    copy = tmp_path / "copy_of_day_0"
    shutil.copyfile(a, copy)
    assert identity("copy", [copy], "--hash-size", "64") == base  # content, not the path
    assert identity("seed", [a], "--hash-size", "64", "--seed", "1") != base
    assert identity("split", [a], "--hash-size", "64", "--split", "7,2,1") != base
    assert identity("inputs", [a, b], "--hash-size", "64") != base
    assert identity("byfile", [a, b], "--hash-size", "64", "--split-by-file") != identity("inputs", [a, b],
                                                                                          "--hash-size", "64")
    meta = read_metadata(tmp_path / "base")
    assert meta.split_recipe["seed"] == 0 and meta.split_recipe["split"] == "8,1,1"
    assert meta.split_recipe["inputs"][0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()


def test_older_metadata_without_the_new_records_still_reads(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    assert run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))[0] == 0
    obj = json.loads((out / "metadata.json").read_text())
    obj.pop("split_recipe")
    for source in obj["sources"]:
        source.pop("sha256", None)
        source.pop("mtime_ns", None)
    (out / "metadata.json").write_text(json.dumps(obj))
    meta = read_metadata(out)
    assert meta.split_recipe is None and metadata_module.split_identity(meta) is None
    assert run_cli(capsys, "inspect", str(out))[0] == 0


def test_synthetic_metadata_has_a_split_identity(tmp_path):
    from multiembed.data.synthetic import SyntheticConfig, generate_dataset

    ids = []
    for name, seed, rows in (("a", 0, 300), ("b", 0, 300), ("c", 1, 300), ("d", 0, 400)):
        meta = generate_dataset(tmp_path / name, rows, SyntheticConfig(seed=seed), progress=False)
        ids.append(metadata_module.split_identity(meta))
        assert metadata_module.split_identity(read_metadata(tmp_path / name)) == ids[-1]
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3


# ---------------------------------------------------------------------------------------------------------------
# 2. fingerprints: size + mtime + full content hash


def test_same_size_edit_outside_any_sampled_block_is_reconverted(tmp_path, capsys):
    lines = [criteo_line(i, str(i % 2)) for i in range(12000)]
    src = write(tmp_path / "day_0", lines)
    size = src.stat().st_size
    assert size > 2 << 20
    out = tmp_path / "out"
    args = convert_args("criteo-1tb", [src], out, "--hash-size", "1000")
    assert run_cli(capsys, *args)[0] == 0
    meta = read_metadata(out)
    assert meta.sources[0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta.sources[0]["mtime_ns"] == src.stat().st_mtime_ns
    # change one digit in the middle of the gap between two of the old fingerprint's 64 KiB samples
    last = size - (1 << 16)
    gap_start = last * 7 // 15 + (1 << 16)
    gap_end = last * 8 // 15
    assert gap_end - gap_start > 1000
    data = bytearray(src.read_bytes())
    token = re.compile(rb"\t[0-9a-f]{8}[\t\n]").search(bytes(data), (gap_start + gap_end) // 2)
    pos = token.start() + 1  # the first hex digit of a categorical token
    assert pos + 8 < gap_end
    data[pos] = ord("f") if data[pos] != ord("f") else ord("e")
    stat = src.stat()
    src.write_bytes(bytes(data))
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # an edit that even keeps the mtime
    status, stdout, err = run_cli(capsys, *args)
    assert status == 0, err
    assert "already converted" not in stdout
    assert read_metadata(out).sources[0]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()


def test_touched_input_is_rechecked(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    args = convert_args("criteo-1tb", [src], out, "--hash-size", "64")
    assert run_cli(capsys, *args)[0] == 0
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    status, stdout, err = run_cli(capsys, *args)
    assert status == 0, err
    assert "already converted" not in stdout
    assert read_metadata(out).sources[0]["mtime_ns"] == st.st_mtime_ns + 10**9


# ---------------------------------------------------------------------------------------------------------------
# 3. one job per directory


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    {patch}
    from multiembed.runtime.locking import exclusive_lock
    with exclusive_lock(Path(sys.argv[1]), "conversion"):
        print("held", flush=True)
        sys.stdin.read()
    """
)
NO_FLOCK = (
    "import errno, fcntl\n"
    "def _no_flock(*a, **k):\n"
    "    raise OSError(errno.ENOLCK, 'No locks available')\n"
    "fcntl.flock = _no_flock\n"
)


def start_holder(directory: Path, no_flock: bool = False) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    code = HOLDER.format(patch=NO_FLOCK if no_flock else "")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO.parent)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop_holder(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive-create"])
def test_second_convert_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch, no_flock):
    import fcntl

    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    holder = start_holder(out, no_flock)
    try:
        if no_flock:
            def _no_flock(*args, **kwargs):
                raise OSError(errno.ENOLCK, "No locks available")

            monkeypatch.setattr(fcntl, "flock", _no_flock)
        status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))
        assert status == 2
        one_line_error(err, "convert", str(out), f"pid {holder.pid}", socket.gethostname())
        assert not (out / "metadata.json").exists()
    finally:
        stop_holder(holder)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".convert", "metadata.json", "test", "train", "val"]


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive-create"])
def test_second_convert_names_the_holder_while_its_temporary_vocabulary_file_exists(
    tmp_path, capsys, monkeypatch, no_flock
):
    """The running conversion is writing its vocabulary (a temporary file beside vocab.npz): a second convert on
    the same --out names that job, not the file as a stranger's."""
    import fcntl

    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    holder = start_holder(out, no_flock)
    try:
        (out / ".vocab.npz.k3j2h1.tmp").write_bytes(b"half a vocabulary")
        if no_flock:
            def _no_flock(*args, **kwargs):
                raise OSError(errno.ENOLCK, "No locks available")

            monkeypatch.setattr(fcntl, "flock", _no_flock)
        status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))
        assert status == 2
        one_line_error(err, "convert", "another conversion is running", f"pid {holder.pid}", socket.gethostname())
        assert (out / ".vocab.npz.k3j2h1.tmp").read_bytes() == b"half a vocabulary"
    finally:
        stop_holder(holder)


def test_exclusive_create_fallback_takes_over_a_dead_local_holder(tmp_path, monkeypatch):
    import fcntl

    from multiembed.runtime.locking import LOCK_FILE, LockHeldError, exclusive_lock

    def _no_flock(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", _no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with exclusive_lock(tmp_path, "test job"):
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            with exclusive_lock(tmp_path, "test job"):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    # a holder on another host is never taken over
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere.example", "pid": 1}))
    with pytest.raises(LockHeldError, match="host elsewhere.example, pid 1"):
        with exclusive_lock(tmp_path, "test job"):
            pass


def test_lock_is_released_and_its_file_removed(tmp_path):
    from multiembed.runtime.locking import LOCK_FILE, LockHeldError, exclusive_lock

    with exclusive_lock(tmp_path, "test job"):
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(LockHeldError, match="another test job"):
            with exclusive_lock(tmp_path, "test job"):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with exclusive_lock(tmp_path, "test job"):
        pass


def test_synth_on_a_locked_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "synth"
    holder = start_holder(out)
    try:
        status, _, err = run_cli(capsys, "synth", "--rows", "200", "--out", str(out), "--no-progress")
        assert status == 2
        one_line_error(err, "synth", str(out), f"pid {holder.pid}")
    finally:
        stop_holder(holder)
    assert run_cli(capsys, "synth", "--rows", "200", "--out", str(out), "--no-progress")[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# 4. no write or delete through a symbolic link inside --out


def test_linked_split_directory_inside_out_is_refused(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "part-00000.parquet").write_bytes(b"not mine")
    (victim / ".part-00003.parquet.tmp-1").write_bytes(b"not mine either")
    out = tmp_path / "out"
    (out / ".convert").mkdir(parents=True)
    (out / "train").symlink_to(victim, target_is_directory=True)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], out, "--hash-size", "64"))
    assert status == 2
    one_line_error(err, "convert", str(out / "train"), "symbolic link")
    assert sorted(p.name for p in victim.iterdir()) == [".part-00003.parquet.tmp-1", "part-00000.parquet"]
    assert (victim / "part-00000.parquet").read_bytes() == b"not mine"


def test_linked_file_inside_a_finished_dataset_is_refused(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    out = tmp_path / "out"
    args = convert_args("criteo-1tb", [src], out, "--hash-size", "64")
    assert run_cli(capsys, *args)[0] == 0
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    (out / ".convert" / "part-00000.json").unlink()
    (out / ".convert" / "part-00000.json").symlink_to(victim)
    status, _, err = run_cli(capsys, *args, "--overwrite")
    assert status == 2
    one_line_error(err, "convert", str(out / ".convert" / "part-00000.json"), "symbolic link")
    assert victim.read_text() == "keep"


# ---------------------------------------------------------------------------------------------------------------
# 5. / 6. inputs: hard links, non-regular files


def test_one_input_twice_through_a_hard_link_is_refused(tmp_path, capsys):
    src = good_criteo(tmp_path / "day_0")
    link = tmp_path / "day_0_again"
    os.link(src, link)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src, link], tmp_path / "out", "--hash-size", "8"))
    assert status == 2
    one_line_error(err, "convert", str(link), "same file", str(src))
    assert not (tmp_path / "out").exists()


def test_fifo_input_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "day_0"
    os.mkfifo(fifo)
    code = ("import sys; from multiembed.cli import main; "
            f"sys.exit(main(['convert', 'criteo-1tb', {str(fifo)!r}, '--out', {str(tmp_path / 'out')!r}, "
            "'--hash-size', '8', '--quiet']))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                              cwd=REPO.parent)
    except subprocess.TimeoutExpired:
        pytest.fail("convert hung on a FIFO input with no writer")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "convert", str(fifo), "not a regular file")


def test_directory_and_device_inputs_are_refused(tmp_path, capsys):
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [Path("/dev/null")], tmp_path / "out",
                                                   "--hash-size", "8"))
    assert status == 2
    one_line_error(err, "convert", "/dev/null", "not a regular file")


# ---------------------------------------------------------------------------------------------------------------
# 7. / 8. byte-order mark, CSV quoting


def read_all(out: Path) -> pa.Table:
    meta = read_metadata(out)
    return pa.concat_tables([pq.read_table(out / f) for s in ("train", "val", "test") for f in meta.splits[s].files])


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_bom_is_stripped_before_parsing(tmp_path, capsys, compressed):
    lines = [criteo_line(i, str(i % 2)) for i in range(30)]
    lines[0] = criteo_line(0, "1")
    lines[11] = "\t".join(lines[11].split("\t")[:-1])  # 39 columns: bad row on line 12
    data = b"\xef\xbb\xbf" + "".join(line + "\n" for line in lines).encode()
    src = tmp_path / ("day_0.gz" if compressed else "day_0")
    src.write_bytes(gzip.compress(data) if compressed else data)
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], tmp_path / "fail", "--hash-size", "64"))
    assert status == 2
    one_line_error(err, "convert", f"{src}:12: columns:")
    status, _, err = run_cli(capsys, *convert_args("criteo-1tb", [src], tmp_path / "skip", "--hash-size", "64",
                                                   "--on-error", "skip", "--split", "0,0,1"))
    assert status == 0, err
    meta = read_metadata(tmp_path / "skip")
    assert meta.skipped == {"column_count": 1}
    table = read_all(tmp_path / "skip")
    assert table.num_rows == 29 and table.column("label").to_pylist()[0] == 1
    # the dense feature of the first row is its I1 (the BOM is not part of any cell)
    first_i1 = lines[0].split("\t")[1]
    assert table.column("dense_I1").to_pylist()[0] == pytest.approx(
        __import__("math").log1p(max(int(first_i1), 0)) if first_i1 else 0.0, rel=1e-6)


def test_bom_before_the_avazu_header(tmp_path, capsys):
    lines = [AVAZU_HEADER] + [",".join([str(10**15 + i), str(i % 2), "14102100"] + ["%x" % ((i + k) % 5)
                                                                                   for k in range(21)])
                              for i in range(30)]
    src = write(tmp_path / "train.csv", lines, prefix=b"\xef\xbb\xbf")
    status, _, err = run_cli(capsys, *convert_args("avazu", [src], tmp_path / "out", "--min-count", "1"))
    assert status == 0, err


def avazu_cells(i: int) -> List[str]:
    return [str(10**15 + i), str(i % 2), "1410210%d" % (i % 3)] + ["%x" % ((i + k) % 5) for k in range(21)]


@pytest.mark.parametrize("with_bad_row", [False, True], ids=["fast-path", "careful-path"])
def test_quoted_avazu_fields_are_unquoted(tmp_path, capsys, with_bad_row):
    plain_lines, quoted_lines = [AVAZU_HEADER], ['"' + AVAZU_HEADER.replace(",", '","') + '"']
    for i in range(60):
        cells = avazu_cells(i)
        plain_lines.append(",".join(cells))
        # rows alternate: every cell quoted, only some quoted, none quoted
        if i % 3 == 0:
            quoted_lines.append(",".join(f'"{c}"' for c in cells))
        elif i % 3 == 1:
            quoted_lines.append(",".join(f'"{c}"' if k % 2 else c for k, c in enumerate(cells)))
        else:
            quoted_lines.append(",".join(cells))
    if with_bad_row:
        plain_lines.append("1,2,3")
        quoted_lines.append('"1","2","3"')
    plain = write(tmp_path / "plain.csv", plain_lines)
    quoted = write(tmp_path / "quoted.csv", quoted_lines)
    extra = ["--min-count", "1", "--split", "1,0,0", "--on-error", "skip"]
    for name, src in (("plain", plain), ("quoted", quoted)):
        status, _, err = run_cli(capsys, *convert_args("avazu", [src], tmp_path / name, *extra))
        assert status == 0, err
    a, b = read_metadata(tmp_path / "plain"), read_metadata(tmp_path / "quoted")
    assert b.vocab_sizes == a.vocab_sizes and b.vocab_fingerprint == a.vocab_fingerprint
    assert b.vocab_sizes["hour"] == 4  # three hours and the OOV id: no '"14102100"' token beside '14102100'
    assert read_all(tmp_path / "quoted").equals(read_all(tmp_path / "plain"))
    assert b.skipped == ({"column_count": 1} if with_bad_row else {})


# ---------------------------------------------------------------------------------------------------------------
# 9. / 10. --vocab-from chains; metadata names files relative to the dataset directory


def test_vocab_from_chains(tmp_path, capsys):
    a_src = good_criteo(tmp_path / "day_0", rows=120)
    b_src = good_criteo(tmp_path / "day_1", rows=30, offset=500)
    c_src = good_criteo(tmp_path / "day_2", rows=30, offset=900)
    assert run_cli(capsys, *convert_args("criteo", [a_src], tmp_path / "a", "--min-count", "2"))[0] == 0
    status, _, err = run_cli(capsys, *convert_args("criteo", [b_src], tmp_path / "b", "--vocab-from",
                                                   str(tmp_path / "a"), "--split", "0,0,1"))
    assert status == 0, err
    assert (tmp_path / "b" / "vocab.npz").is_file()
    status, _, err = run_cli(capsys, *convert_args("criteo", [c_src], tmp_path / "c", "--vocab-from",
                                                   str(tmp_path / "b"), "--split", "0,0,1"))
    assert status == 0, err
    fingerprints = {read_metadata(tmp_path / n).vocab_fingerprint for n in "abc"}
    assert len(fingerprints) == 1
    # a re-run of b is a no-op (its vocabulary copy is not mistaken for a counting pass of its own)
    status, stdout, err = run_cli(capsys, *convert_args("criteo", [b_src], tmp_path / "b", "--vocab-from",
                                                        str(tmp_path / "a"), "--split", "0,0,1"))
    assert status == 0 and "already converted" in stdout, err


def test_moved_dataset_still_loads_and_metadata_has_no_absolute_paths(tmp_path, capsys, monkeypatch):
    (tmp_path / "raw").mkdir()
    a_src = good_criteo(tmp_path / "raw" / "day_0", rows=120)
    b_src = good_criteo(tmp_path / "raw" / "day_1", rows=30, offset=500)
    assert run_cli(capsys, *convert_args("criteo", [a_src], tmp_path / "a", "--min-count", "2"))[0] == 0
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, *convert_args("criteo", [b_src], Path("b"), "--vocab-from", "a"))
    assert status == 0, err
    from multiembed.data.synthetic import SyntheticConfig, generate_dataset

    generate_dataset(tmp_path / "s", 300, SyntheticConfig(seed=0), tsv_path=tmp_path / "s" / "rows.tsv",
                     progress=False)
    for name in ("a", "b", "s"):
        obj = json.loads((tmp_path / name / "metadata.json").read_text())
        absolute = [s for s in strings_in(obj) if s.startswith("/") or str(tmp_path) in s]
        assert absolute == [], (name, absolute)
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    for name in ("a", "b", "s"):
        os.rename(tmp_path / name, moved / name)
    monkeypatch.chdir(moved / "s")
    pytest.importorskip("torchrec")
    from multiembed.data.loader import ParquetBatchLoader

    for name in ("a", "b", "s"):
        loader = ParquetBatchLoader(moved / name, "test", batch_size=8, last_batch="keep", prefetch=0)
        assert sum(int(batch.weights.sum()) for batch in loader) == read_metadata(moved / name).split_rows()["test"]
    # the moved chained dataset is still a --vocab-from source
    status, _, err = run_cli(capsys, *convert_args("criteo", [b_src], moved / "c", "--vocab-from", str(moved / "b"),
                                                   "--split", "0,0,1"))
    assert status == 0, err

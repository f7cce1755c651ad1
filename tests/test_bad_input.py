"""The data-side bad-input corpus: malformed Criteo TSV, Avazu CSV, gzip, Parquet, metadata.json, vocabularies and
command-line arguments.

Each case runs the CLI in-process and expects either exit status 2 with exactly one stderr line
``multiembed <cmd>: error: FILE:LINE: FIELD: what`` (no traceback, nothing half-written left behind), or under
``--on-error skip`` a counted skip reported in metadata.json and in the printed summary.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np
import pytest

from multiembed.cli import main
from multiembed.data.metadata import read_metadata

AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def criteo_line(i: int, label: str = "0") -> str:
    ints = [str((i * 7 + k) % 50 - 3) if (i + k) % 5 else "" for k in range(13)]
    cats = ["%08x" % ((i * 31 + k * 17) % 97) if (i + k) % 9 else "" for k in range(26)]
    return "\t".join([label] + ints + cats)


def criteo_cells(i: int) -> List[str]:
    return criteo_line(i).split("\t")


def avazu_line(i: int, click: str = "0") -> str:
    return ",".join([str(10**15 + i), click, "14102100"] + ["%x" % ((i + k) % 5) for k in range(21)])


def write(path: Path, lines: Sequence[str], newline: str = "\n") -> Path:
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8", errors="surrogateescape"))
    return path


def good_criteo(tmp_path: Path, rows: int = 20, name: str = "day_0") -> Path:
    return write(tmp_path / name, [criteo_line(i, str(i % 2)) for i in range(rows)])


def run_cli(capsys, *args: str):
    try:
        status = main(list(args))
    except SystemExit as e:  # argparse's own errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, command: str, *needles: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"multiembed {command}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def assert_nothing_half_written(out: Path) -> None:
    assert not (out / "metadata.json").exists()
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def convert_fail(capsys, tmp_path: Path, dataset: str, src: Path, *extra: str) -> str:
    out = tmp_path / "out"
    status, _, err = run_cli(capsys, "convert", dataset, str(src), "--out", str(out), "--quiet", *extra)
    assert status == 2
    if out.exists():
        assert_nothing_half_written(out)
    return err


# ---------------------------------------------------------------------------------------------------------------
# bad rows: each fails at its line under --on-error fail and is one counted skip under --on-error skip

ROW_CASES = {
    # name: (dataset, builder of the bad line from a good line number i, field in the message, skip reason)
    "criteo_too_few_columns": ("criteo", lambda i: "\t".join(criteo_cells(i)[:39]), "columns", "column_count"),
    "criteo_too_many_columns": ("criteo", lambda i: criteo_line(i) + "\textra", "columns", "column_count"),
    "criteo_empty_line": ("criteo", lambda i: "", "columns", "column_count"),
    "criteo_word_in_integer_column": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:5] + ["abc"] + criteo_cells(i)[6:]), "I5", "bad_integer"),
    "criteo_float_in_integer_column": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:1] + ["1.5"] + criteo_cells(i)[2:]), "I1", "bad_integer"),
    "criteo_integer_overflows_64_bits": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:3] + ["99999999999999999999"] + criteo_cells(i)[4:]), "I3",
        "integer_overflow"),
    "criteo_negative_overflow": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:2] + ["-9223372036854775809"] + criteo_cells(i)[3:]), "I2",
        "integer_overflow"),
    "criteo_nan_in_integer_column": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:13] + ["nan"] + criteo_cells(i)[14:]), "I13", "nan_or_inf"),
    "criteo_inf_in_integer_column": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:7] + ["-inf"] + criteo_cells(i)[8:]), "I7", "nan_or_inf"),
    "criteo_label_two": ("criteo", lambda i: "\t".join(["2"] + criteo_cells(i)[1:]), "label", "bad_label"),
    "criteo_label_empty": ("criteo", lambda i: "\t".join([""] + criteo_cells(i)[1:]), "label", "bad_label"),
    "criteo_label_word": ("criteo", lambda i: "\t".join(["yes"] + criteo_cells(i)[1:]), "label", "bad_label"),
    "criteo_label_negative": ("criteo", lambda i: "\t".join(["-1"] + criteo_cells(i)[1:]), "label", "bad_label"),
    "criteo_bad_utf8_token": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:20] + ["ab\udcff\udcfe"] + criteo_cells(i)[21:]), "C7",
        "bad_utf8"),
    "criteo_control_character_in_token": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:30] + ["a\x00b"] + criteo_cells(i)[31:]), "C17", "bad_token"),
    "criteo_megabyte_token": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:14] + ["f" * 3_000_000] + criteo_cells(i)[15:]), "C1",
        "token_too_long"),
    "criteo_megabyte_line_without_tabs": ("criteo", lambda i: "x" * 3_000_000, "columns", "column_count"),
    "criteo_carriage_return_inside_line": (
        "criteo", lambda i: "\t".join(criteo_cells(i)[:20] + ["ab\rcd"] + criteo_cells(i)[21:]), "line",
        "bad_line_ending"),
    "avazu_click_not_binary": ("avazu", lambda i: avazu_line(i, click="3"), "click", "bad_label"),
    "avazu_too_few_columns": ("avazu", lambda i: ",".join(avazu_line(i).split(",")[:23]), "columns", "column_count"),
    "avazu_bad_utf8_token": (
        "avazu", lambda i: ",".join(avazu_line(i).split(",")[:5] + ["\udcc3("] + avazu_line(i).split(",")[6:]),
        "site_id", "bad_utf8"),
}


def _row_case_file(tmp_path: Path, dataset: str, bad: Callable[[int], str], bad_index: int, rows: int,
                   newline: str = "\n", gz: bool = False) -> Path:
    if dataset == "criteo":
        lines = [criteo_line(i, str(i % 2)) for i in range(rows)]
        lines[bad_index] = bad(bad_index)
        name = "day_0"
    else:
        lines = [AVAZU_HEADER] + [avazu_line(i, str(i % 2)) for i in range(rows)]
        lines[1 + bad_index] = bad(bad_index)
        name = "train.csv"
    path = tmp_path / (name + (".gz" if gz else ""))
    data = "".join(line + newline for line in lines).encode("utf-8", errors="surrogateescape")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_fails_with_file_line_field(case, tmp_path, capsys):
    dataset, bad, field, _ = ROW_CASES[case]
    src = _row_case_file(tmp_path, dataset, bad, bad_index=6, rows=12)
    line = 7 + (1 if dataset == "avazu" else 0)  # 1-based physical line, the Avazu header included
    err = convert_fail(capsys, tmp_path, dataset, src)
    assert_one_line_error(err, "convert", f"{src}:{line}: {field}: ")


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_is_a_counted_skip(case, tmp_path, capsys):
    dataset, bad, _, reason = ROW_CASES[case]
    src = _row_case_file(tmp_path, dataset, bad, bad_index=6, rows=12)
    out = tmp_path / "out"
    status, stdout, err = run_cli(capsys, "convert", dataset, str(src), "--out", str(out), "--quiet",
                                  "--on-error", "skip", "--min-count", "1")
    assert status == 0, err
    meta = read_metadata(out)
    assert meta.skipped == {reason: 1}
    assert meta.rows_read == 12 and sum(meta.split_rows().values()) == 11
    assert f"{reason} 1" in stdout  # the printed summary names the reason and the count


def test_every_row_bad_under_skip_gives_an_empty_counted_dataset(tmp_path, capsys):
    src = write(tmp_path / "day_0", ["\t".join(["x"] + criteo_cells(i)[1:]) for i in range(25)])
    for mode in (["--min-count", "1"], ["--hash-size", "10"]):
        out = tmp_path / ("out" + mode[0])
        status, stdout, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(out), "--quiet",
                                      "--on-error", "skip", *mode)
        assert status == 0, err
        meta = read_metadata(out)
        assert meta.skipped == {"bad_label": 25} and meta.rows_read == 25
        assert meta.split_rows() == {"train": 0, "val": 0, "test": 0}
        assert "skipped 25" in stdout


def test_bad_row_in_gzip_names_its_line(tmp_path, capsys):
    src = _row_case_file(tmp_path, "criteo", ROW_CASES["criteo_label_two"][1], bad_index=9, rows=15, gz=True)
    err = convert_fail(capsys, tmp_path, "criteo", src)
    assert_one_line_error(err, "convert", f"{src}:10: label: expected 0 or 1")


def test_bad_row_in_crlf_file_names_its_line(tmp_path, capsys):
    src = _row_case_file(tmp_path, "criteo", ROW_CASES["criteo_word_in_integer_column"][1], bad_index=3, rows=8,
                         newline="\r\n")
    err = convert_fail(capsys, tmp_path, "criteo", src)
    assert_one_line_error(err, "convert", f"{src}:4: I5: expected an integer, got 'abc'")


def test_first_of_several_bad_rows_is_reported(tmp_path, capsys):
    lines = [criteo_line(i) for i in range(30)]
    lines[12] = "\t".join(["7"] + criteo_cells(12)[1:])
    lines[20] = "\t".join(criteo_cells(20)[:10])
    src = write(tmp_path / "day_0", lines)
    err = convert_fail(capsys, tmp_path, "criteo", src)
    assert_one_line_error(err, "convert", f"{src}:13: label:")


# ---------------------------------------------------------------------------------------------------------------
# bad files


def test_line_longer_than_the_line_limit(tmp_path, monkeypatch):
    """A line longer than MAX_LINE_BYTES (64 MiB; lowered here with the read size to keep the test small) stops with
    its line number in both error modes instead of being buffered whole."""
    import multiembed.data.rawlog as rawlog
    from multiembed.data.convert import ConvertOptions, convert

    monkeypatch.setattr(rawlog, "MAX_LINE_BYTES", 1 << 20)
    lines = [criteo_line(i) for i in range(5)] + ["z" * (3 << 20)] + [criteo_line(9)]
    src = write(tmp_path / "day_0", lines)
    for on_error in ("fail", "skip"):
        options = ConvertOptions("criteo-1tb", [str(src)], str(tmp_path / on_error), on_error=on_error,
                                 chunk_bytes=256 << 10, progress=False)
        with pytest.raises(rawlog.InputError) as error:
            convert(options)
        assert str(error.value) == f"{src}:6: line: longer than 1 MiB without a newline (not a click log?)"
        assert_nothing_half_written(tmp_path / on_error)


def test_empty_file(tmp_path, capsys):
    src = tmp_path / "day_0"
    src.write_bytes(b"")
    assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: empty file")


def test_empty_gzip_file(tmp_path, capsys):
    src = tmp_path / "day_0.gz"
    src.write_bytes(gzip.compress(b""))
    assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: empty after decompression")


def test_missing_file(tmp_path, capsys):
    src = tmp_path / "nope.txt"
    assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: no such file")


def test_directory_given_as_input(tmp_path, capsys):
    src = tmp_path / "a_dir"
    src.mkdir()
    assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not stop root from reading (see the next test)")
def test_unreadable_file_chmod_000(tmp_path, capsys):
    src = good_criteo(tmp_path)
    src.chmod(0)
    try:
        assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: permission denied")
    finally:
        src.chmod(0o644)


def test_unreadable_file_when_access_is_denied(tmp_path, capsys, monkeypatch):
    """The same refusal as chmod 000, made to happen also under root by denying os.access for this one path."""
    src = good_criteo(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == src else real_access(p, mode, **kw))
    assert_one_line_error(convert_fail(capsys, tmp_path, "criteo", src), "convert", f"{src}: permission denied")


def test_truncated_gzip(tmp_path, capsys):
    data = gzip.compress("".join(criteo_line(i) + "\n" for i in range(2000)).encode())
    src = tmp_path / "day_0.gz"
    src.write_bytes(data[: len(data) // 2])
    err = convert_fail(capsys, tmp_path, "criteo", src)
    assert_one_line_error(err, "convert", f"{src}:", "truncated gzip stream")


def test_corrupt_gzip(tmp_path, capsys):
    src = tmp_path / "day_0.gz"
    src.write_bytes(b"this is not gzip data\n" * 10)
    err = convert_fail(capsys, tmp_path, "criteo", src)
    assert_one_line_error(err, "convert", f"{src}:1: corrupt gzip data")


def test_avazu_wrong_header(tmp_path, capsys):
    header = AVAZU_HEADER.replace("banner_pos", "banner")
    src = write(tmp_path / "train.csv", [header] + [avazu_line(i) for i in range(5)])
    err = convert_fail(capsys, tmp_path, "avazu", src)
    assert_one_line_error(err, "convert", f"{src}:1: header: column 5 is 'banner', expected 'banner_pos'")


def test_avazu_header_only(tmp_path, capsys):
    src = write(tmp_path / "train.csv", [AVAZU_HEADER])
    assert_one_line_error(convert_fail(capsys, tmp_path, "avazu", src), "convert", f"{src}: no data rows")


def test_avazu_without_header(tmp_path, capsys):
    src = write(tmp_path / "train.csv", [avazu_line(i) for i in range(5)])
    err = convert_fail(capsys, tmp_path, "avazu", src)
    assert_one_line_error(err, "convert", f"{src}:1: header: column 1 is ")


def test_full_disk_reported_without_partial_output(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, in a child process) makes the Parquet write fail like a full disk."""
    src = write(tmp_path / "day_0", [criteo_line(i) for i in range(3000)])
    out = tmp_path / "out"
    code = (
        "import resource, sys\n"
        "from multiembed.cli import main\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        f"sys.exit(main(['convert', 'criteo-1tb', {str(src)!r}, '--out', {str(out)!r}, '--hash-size', '1000', "
        "'--quiet']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, "convert", "part-00000.parquet: cannot write", "File too large")
    assert_nothing_half_written(out)
    assert not list(out.rglob("*.parquet"))


def test_output_path_is_a_file(tmp_path, capsys):
    src = good_criteo(tmp_path)
    target = tmp_path / "out"
    target.write_text("x")
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(target), "--quiet")
    assert status == 2
    assert_one_line_error(err, "convert", f"{target}: exists and is not a directory")


def test_output_directory_holds_other_files(tmp_path, capsys):
    src = good_criteo(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(target), "--quiet")
    assert status == 2
    assert_one_line_error(err, "convert", f"{target}: not empty and not a conversion in progress")
    assert (target / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# --vocab-from and metadata.json / Parquet disagreements


@pytest.fixture
def paper_dataset(tmp_path, capsys) -> Path:
    out = tmp_path / "paper"
    status, _, err = run_cli(capsys, "convert", "criteo", str(good_criteo(tmp_path, 40)), "--out", str(out),
                             "--min-count", "2", "--quiet")
    assert status == 0, err
    return out


def _edit_metadata(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / "metadata.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def vocab_from_fails(capsys, tmp_path: Path, source: Path, *needles: str, dataset: str = "criteo") -> None:
    src = good_criteo(tmp_path, 10, name="day_1") if dataset == "criteo" else \
        write(tmp_path / "t.csv", [AVAZU_HEADER, avazu_line(1)])
    status, _, err = run_cli(capsys, "convert", dataset, str(src), "--out", str(tmp_path / "held_out"),
                             "--vocab-from", str(source), "--split", "0,0,1", "--quiet")
    assert status == 2
    assert_one_line_error(err, "convert", *needles)


def test_vocab_from_directory_without_metadata(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    vocab_from_fails(capsys, tmp_path, empty, f"{empty / 'metadata.json'}: missing")


def test_vocab_from_malformed_json(tmp_path, capsys, paper_dataset):
    (paper_dataset / "metadata.json").write_text('{"format_version": 1, "dataset": ')
    vocab_from_fails(capsys, tmp_path, paper_dataset, f"{paper_dataset / 'metadata.json'}: line 1: not valid JSON")


def test_vocab_from_metadata_missing_fields_key(tmp_path, capsys, paper_dataset):
    _edit_metadata(paper_dataset, lambda m: m.pop("fields"))
    vocab_from_fails(capsys, tmp_path, paper_dataset, "metadata.json: fields: missing")


def test_vocab_from_other_dataset(tmp_path, capsys, paper_dataset):
    vocab_from_fails(capsys, tmp_path, paper_dataset, "dataset: 'criteo'", "'avazu'", dataset="avazu")


def test_vocab_from_missing_vocabulary_file(tmp_path, capsys, paper_dataset):
    (paper_dataset / "vocab.npz").unlink()
    vocab_from_fails(capsys, tmp_path, paper_dataset, f"{paper_dataset / 'vocab.npz'}: missing")


def test_vocab_from_corrupted_vocabulary(tmp_path, capsys, paper_dataset):
    with np.load(paper_dataset / "vocab.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["field_20"] = arrays["field_20"][:-1]  # one token silently dropped from C8
    with open(paper_dataset / "vocab.npz", "wb") as f:
        np.savez(f, **arrays)
    vocab_from_fails(capsys, tmp_path, paper_dataset, "vocab.npz: fingerprint:", "corrupted vocabulary")


def test_vocab_from_garbage_vocabulary_file(tmp_path, capsys, paper_dataset):
    (paper_dataset / "vocab.npz").write_bytes(b"\x00garbage")
    vocab_from_fails(capsys, tmp_path, paper_dataset, "vocab.npz: not a readable vocabulary")


def test_vocab_from_fingerprint_disagrees_with_metadata(tmp_path, capsys, paper_dataset):
    _edit_metadata(paper_dataset, lambda m: m.update(vocab_fingerprint="0" * 64))
    vocab_from_fails(capsys, tmp_path, paper_dataset, "metadata.json: vocab_fingerprint:")


def test_vocab_from_sizes_disagree_with_vocabulary(tmp_path, capsys, paper_dataset):
    _edit_metadata(paper_dataset, lambda m: m["fields"][3].update(vocab_size=m["fields"][3]["vocab_size"] + 5))
    vocab_from_fails(capsys, tmp_path, paper_dataset, "metadata.json: fields: vocabulary sizes disagree")


def inspect_fails(capsys, directory: Path, *needles: str) -> None:
    status, _, err = run_cli(capsys, "inspect", str(directory))
    assert status == 2
    assert_one_line_error(err, "inspect", *needles)


def test_inspect_metadata_not_json(capsys, paper_dataset):
    (paper_dataset / "metadata.json").write_text("not json")
    inspect_fails(capsys, paper_dataset, "metadata.json: line 1: not valid JSON")


def test_inspect_field_missing_from_parquet(capsys, paper_dataset):
    _edit_metadata(paper_dataset, lambda m: m["fields"][0].update(name="I99"))
    inspect_fails(capsys, paper_dataset, "train/part-00000.parquet: column I99: missing")


def test_inspect_parquet_type_disagrees_with_metadata(capsys, paper_dataset):
    _edit_metadata(paper_dataset, lambda m: m["fields"][5].update(multi_hot=True))
    inspect_fails(capsys, paper_dataset, "part-00000.parquet: column I6: type int64")


def test_inspect_row_count_disagrees(capsys, paper_dataset):
    def edit(m):
        m["splits"]["val"]["files"][0]["rows"] += 1
        m["splits"]["val"]["rows"] += 1

    _edit_metadata(paper_dataset, edit)
    inspect_fails(capsys, paper_dataset, "val/part-00000.parquet: 4 rows, metadata.json says 5")


def test_inspect_ids_beyond_vocabulary(capsys, paper_dataset):
    """Vocabulary sizes smaller than the ids in the data (e.g. metadata of another conversion)."""
    _edit_metadata(paper_dataset, lambda m: m["fields"][13].update(vocab_size=1))
    inspect_fails(capsys, paper_dataset, "column C1: ids span [0,", "vocab_size 1")


def test_inspect_parquet_file_missing(capsys, paper_dataset):
    (paper_dataset / "test" / "part-00000.parquet").unlink()
    inspect_fails(capsys, paper_dataset, "test/part-00000.parquet: missing")


def test_inspect_parquet_file_garbage(capsys, paper_dataset):
    (paper_dataset / "test" / "part-00000.parquet").write_bytes(b"PAR1 not really")
    inspect_fails(capsys, paper_dataset, "test/part-00000.parquet: not a readable Parquet file")


def test_inspect_not_a_dataset_directory(tmp_path, capsys):
    inspect_fails(capsys, tmp_path / "nowhere", "no such dataset directory")


# ---------------------------------------------------------------------------------------------------------------
# bad command-line arguments


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--split", "8,1"], "--split: expected three weights"),
        (["--split", "8,-1,1"], "--split: val weight -1 is negative"),
        (["--split", "8,x,1"], "--split: val weight 'x' is not a number"),
        (["--split", "0,0,0"], "sum to zero"),
        (["--min-count", "-1"], "--min-count must be >= 1"),
        (["--min-count", "0"], "--min-count must be >= 1"),
        (["--hash-size", "0"], "--hash-size must be in [1,"),
        (["--hash-size", str(2**33)], "--hash-size must be in [1,"),
        (["--hash-sizes", "C99=10"], "--hash-sizes: unknown field 'C99'"),
        (["--hash-sizes", "C1:10"], "--hash-sizes: expected FIELD=SIZE"),
        (["--min-count", "3", "--hash-size", "10"], "exclude each other"),
        (["--mode", "paper", "--hash-size", "10"], "apply to hashing mode"),
        (["--split-by-file"], "--split-by-file needs at least two inputs"),
        (["--split", "8,1,1", "--split-by-file"], "--split and --split-by-file exclude each other"),
        (["--seed", "-4"], "--seed must be >= 0"),
        (["--row-group-size", "0"], "--row-group-size must be >= 1"),
    ],
)
def test_bad_option(args, needle, tmp_path, capsys):
    src = good_criteo(tmp_path)
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(tmp_path / "out"), "--quiet", *args)
    assert status == 2
    assert_one_line_error(err, "convert", needle)
    assert not (tmp_path / "out").exists()  # options are checked before anything is created


def test_vocab_from_combined_with_min_count(tmp_path, capsys, paper_dataset):
    src = good_criteo(tmp_path, name="day_1")
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(tmp_path / "x"), "--quiet",
                             "--vocab-from", str(paper_dataset), "--min-count", "3")
    assert status == 2
    assert_one_line_error(err, "convert", "--vocab-from takes the vocabulary", "drop --min-count")


def test_same_input_twice(tmp_path, capsys):
    src = good_criteo(tmp_path)
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), str(src), "--out", str(tmp_path / "o"), "--quiet")
    assert status == 2
    assert_one_line_error(err, "convert", f"{src}: given twice as an input")


@pytest.mark.parametrize("args", [["--min-count", "abc"], ["--on-error", "ignore"], ["--mode", "magic"]])
def test_argparse_rejects_malformed_values(args, tmp_path, capsys):
    src = good_criteo(tmp_path)
    status, _, err = run_cli(capsys, "convert", "criteo", str(src), "--out", str(tmp_path / "o"), *args)
    assert status == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("multiembed convert: error: argument")


def test_unknown_dataset_format(tmp_path, capsys):
    status, _, err = run_cli(capsys, "convert", "kdd12", str(good_criteo(tmp_path)), "--out", str(tmp_path / "o"))
    assert status == 2
    assert "invalid choice: 'kdd12'" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "encoding, named",
    [("utf-16", "is UTF-16 (little-endian) encoded (starts with bytes FF FE)"),
     ("utf-16-be", "holds NUL bytes in its first line (UTF-16 or UTF-32 text?)"),
     ("utf-32", "is UTF-32 (little-endian) encoded (starts with bytes FF FE 00 00)")],
)
@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
def test_another_text_encoding_is_named_as_such(tmp_path, capsys, encoding: str, named: str, dataset: str) -> None:
    lines = ([criteo_line(i, str(i % 2)) for i in range(20)] if dataset == "criteo"
             else [AVAZU_HEADER] + [avazu_line(i, str(i % 2)) for i in range(20)])
    src = tmp_path / "log"
    src.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    err = convert_fail(capsys, tmp_path, dataset, src)
    line = assert_one_line_error(err, "convert", f"{src}: {named}", "iconv")
    assert "\\x" not in line

"""Option bounds, pasteable hints, and path / pipeline-file errors: one line with the fix.

Each case here used to be accepted silently, fail late as "unexpected X", or print a command
that did not work when pasted.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import featurecache as fc
from featurecache.cli import _common
from featurecache.cli.main import app
from featurecache.errors import PipelineError, UsageError
from featurecache.pipelines.run import load_pipeline, run_pipeline

SMALL = [
    "--data",
    "builtin:digits",
    "--backbone",
    "mobilenetv2",
    "--weights",
    "random",
    "--size",
    "32",
    "--limit",
    "20",
]
SMALL_API = dict(backbone="mobilenetv2", weights="random", size=32, limit=20)


def _error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------ item 6: bounds


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (dict(views=1_000_000_000, augment="flip"), "--views must be an integer from 0 to 64"),
        (dict(views=65, augment="flip"), "--views must be an integer from 0 to 64"),
        (dict(views=-1), "--views must be an integer from 0 to 64"),
        (dict(size=0), "--size must be an integer from 1 to 1024"),
        (dict(size=100_000), "--size must be an integer from 1 to 1024"),
        (dict(seed=-1), "--seed must be an integer from 0 to 4294967295"),
        (dict(seed=2**32), "--seed must be an integer from 0 to 4294967295"),
        (dict(batch_size=0), "--batch-size must be an integer >= 1"),
        (dict(batch_size=-5), "--batch-size must be an integer >= 1"),
        (dict(workers=0), "--workers must be an integer from 1 to 256"),
        (dict(workers=-1), "--workers must be an integer from 1 to 256"),
        (dict(workers=10**6), "--workers must be an integer from 1 to 256"),
        (dict(views=2.5, augment="flip"), "--views must be an integer"),
        (dict(augment_splits=("bogus",)), "--augment-splits ('bogus',) must name splits among train, val, test"),
        (dict(augment_splits="train"), "must name splits among train, val, test"),
        (dict(views=1, augment="flip", augment_splits=()), "--views 1 needs at least one split to augment"),
    ],
)
def test_api_rejects_out_of_range_options_before_any_work(options: dict, needle: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UsageError) as info:
        fc.extract("builtin:digits", **{**SMALL_API, **options}, cache_dir=cache, progress=False)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())  # nothing planned, nothing written
    if "batch_size" not in options and "workers" not in options:
        with pytest.raises(UsageError, match=re.escape(needle)):
            fc.plan("builtin:digits", **{**SMALL_API, **options}, cache_dir=cache)


def test_bounds_say_why_views_are_capped() -> None:
    with pytest.raises(UsageError, match="each view is another backbone pass.*finetune --augment"):
        fc.plan("builtin:digits", **SMALL_API, views=100, augment="flip")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--views", "-1"], "--views"),
        (["--views", "1000000000", "--augment", "flip"], "--views"),
        (["--size", "0"], "--size"),
        (["--size", "100000"], "--size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-5"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--workers", "-1"], "--workers"),
        (["--workers", "0"], "--workers"),
        (["--limit", "0"], "--limit"),
        (["--augment-splits", "bogus"], "--augment-splits"),
        (["--views", "abc"], "--views"),
    ],
)
def test_cli_rejects_out_of_range_options_in_one_line(args: list[str], option: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["extract", *SMALL, *args, "--cache", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert option in _error_line(res)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_typer_usage_errors_are_one_line_too() -> None:
    res = CliRunner().invoke(app, ["extract", "--no-such-option"])
    assert res.exit_code == 2 and "No such option: --no-such-option" in _error_line(res)
    res = CliRunner().invoke(app, ["cache", "info"])
    assert res.exit_code == 2 and "Missing argument" in _error_line(res)
    res = CliRunner().invoke(app, ["--no-such-option"])
    assert res.exit_code == 2 and "No such option: --no-such-option" in _error_line(res)
    res = CliRunner().invoke(app, ["cache"])  # no arguments: the help, as before
    assert res.exit_code == 2 and "Usage:" in res.output and "error:" not in res.output


# ------------------------------------------------------------------------------ item 12: pasteable hints


def _pasted(line: str) -> list[str]:
    """The command in backticks in ``line``, split as a shell would, without the program name."""
    found = re.findall(r"`(featurecache [^`]+)`", line)
    assert found, line
    words = shlex.split(found[-1])
    assert words[0] == "featurecache"
    return words[1:]


def test_failures_hint_carries_cache_and_works_when_pasted(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_folder
    (data / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "my cache"  # a space, so the hint must be quoted to paste
    monkeypatch.setenv("FEATURECACHE_DIR", str(tmp_path / "elsewhere"))  # the default is the wrong cache
    res = CliRunner().invoke(
        app,
        [
            "extract",
            "--data",
            str(data),
            "--backbone",
            "mobilenetv2",
            "--weights",
            "random",
            "--size",
            "32",
            "-q",
            "--cache",
            str(cache),
        ],
    )
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if "could not be decoded" in ln]
    assert len(warning) == 1, res.stderr
    pasted = CliRunner().invoke(app, _pasted(warning[0]))
    assert pasted.exit_code == 0, pasted.output
    assert "broken.jpg" in pasted.stdout


def test_error_hints_carry_cache_and_work_when_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("FEATURECACHE_DIR", str(tmp_path / "elsewhere"))
    res = CliRunner().invoke(app, ["train-head", "--cache", str(cache)])
    assert res.exit_code == 2
    pasted = CliRunner().invoke(app, _pasted(_error_line(res)))
    assert pasted.exit_code == 0, pasted.output
    assert str(cache) in pasted.output  # listed the cache the user named, not $FEATURECACHE_DIR


def test_with_cache_option_adds_cache_only_where_a_command_takes_it() -> None:
    msg = "see `featurecache cache rm abc --yes`, `featurecache backbones --layers vgg19` and `featurecache cache ls --cache /x`"
    out = _common.with_cache_option(msg, Path("/my cache"))
    assert "`featurecache cache rm abc --yes --cache '/my cache'`" in out
    assert "`featurecache backbones --layers vgg19`" in out
    assert "`featurecache cache ls --cache /x`" in out
    assert _common.with_cache_option(msg, None) == msg


def test_commands_without_cache_match_the_app() -> None:
    def walk(group, prefix=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from walk(cmd, (*prefix, name))
            else:
                yield (*prefix, name), any("--cache" in p.opts for p in cmd.params)

    commands = dict(walk(typer.main.get_command(app)))
    assert {path[0] for path, has in commands.items() if not has} == _common.COMMANDS_WITHOUT_CACHE
    assert all(has for path, has in commands.items() if path[0] not in _common.COMMANDS_WITHOUT_CACHE)


# ------------------------------------------------------------------------------ item 16: paths and pipeline files


def test_cache_that_is_a_file_is_one_line_with_the_fix(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = CliRunner().invoke(app, ["cache", "ls", "--cache", str(afile)])
    assert res.exit_code == 2
    assert "is a file, not a folder; pass a folder for the cache" in _error_line(res)
    res = CliRunner().invoke(app, ["extract", *SMALL, "--cache", str(afile / "sub")])
    assert res.exit_code == 2
    assert f"is inside {afile}, which is a file" in _error_line(res)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_cache_is_one_line_with_the_fix(tmp_path: Path) -> None:
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        res = CliRunner().invoke(app, ["extract", *SMALL, "--cache", str(cache), "-q"])
    finally:
        cache.chmod(0o755)
    assert res.exit_code == 1
    assert f"cache folder {cache} cannot be written (permission denied" in _error_line(res)


def test_path_errors_name_the_path_and_the_fix() -> None:
    def denied(*, cache: Path | None) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/cache/.locks/k.lease")

    with pytest.raises(typer.Exit):
        _common.handle_errors(denied)(cache=Path("/data/cache"))
    line = _common._one_line(
        PermissionError(errno.EACCES, "Permission denied", "/data/cache/.locks/k.lease"), Path("/data/cache")
    )
    assert line == (
        "cache folder /data/cache cannot be written (permission denied: /data/cache/.locks/k.lease); "
        "pass --cache a folder you can write to, or fix its permissions"
    )
    line = _common._one_line(OSError(errno.EROFS, "Read-only file system", "/runs/x"), None)
    assert line == "/runs/x: read-only file system; check that path and its permissions"
    assert "unexpected" not in line


def test_pipeline_value_of_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[extract]\nviews = "2"\n[sweep]\nheads = "logreg,dense"\n')
    with pytest.raises(PipelineError, match=r"\[extract\] views = '2' must be an integer, not a string"):
        load_pipeline(f)
    f.write_text('[extract]\non_error = "maybe"\n')
    with pytest.raises(PipelineError, match=r"on_error = 'maybe' must be one of 'skip', 'fail'"):
        load_pipeline(f)
    f.write_text('[sweep]\nheads = ["logreg", 3]\n')
    with pytest.raises(PipelineError, match=r"heads = \['logreg', 3\] must be a list of strings"):
        load_pipeline(f)
    with pytest.raises(PipelineError, match=r"\[finetune\] epochs = 2.5 must be an integer, not a number"):
        load_pipeline(PIPELINES / "digits_demo.toml", overrides=["finetune.epochs=2.5"])
    f.write_text('[sweep]\nfeatures = "abc"\n')
    with pytest.raises(PipelineError, match=r"\[sweep\] features is set by the extract stage"):
        load_pipeline(f)
    res = CliRunner().invoke(app, ["run", str(f)])
    assert res.exit_code == 2 and "[sweep] features is set by" in _error_line(res)


PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def test_shipped_pipelines_pass_the_type_check() -> None:
    for f in sorted(PIPELINES.glob("*.toml")):
        load_pipeline(f)


def test_pipeline_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.toml"
    f.write_bytes('[extract]\n# caf\u00e9\ndata = "builtin:digits"\n'.encode("latin-1"))
    res = CliRunner().invoke(app, ["run", str(f)])
    assert res.exit_code == 2
    assert "is not UTF-8 text (byte 0xe9 on line 2)" in _error_line(res)


def test_pipeline_cache_dir_and_cache_option_together(tmp_path: Path) -> None:
    from_file, from_option = tmp_path / "file-cache", tmp_path / "option-cache"
    f = tmp_path / "p.toml"
    f.write_text(
        '[extract]\ndata = "builtin:digits"\nbackbone = "mobilenetv2"\nweights = "random"\nsize = 32\nlimit = 20\n'
        f'cache_dir = "{from_file}"\n'
    )
    res = run_pipeline(f, cache_dir=from_option, progress=False)  # --cache wins, as --runs does
    assert Path(res.stages["extract"]["path"]).parents[1] == from_option
    assert not from_file.exists()
    res = run_pipeline(f, progress=False)  # without --cache, the file's cache_dir
    assert Path(res.stages["extract"]["path"]).parents[1] == from_file

    f.write_text(f'[extract]\ncache_dir = "{from_file}"\n[sweep]\ncache_dir = "{from_option}"\n')
    with pytest.raises(PipelineError, match="different cache_dir values"):
        load_pipeline(f)


# ------------------------------------------------------------------------------ issue 20, item 17


def test_grid_with_comma_between_parameters_says_to_use_a_semicolon() -> None:
    from featurecache.training.sweeps.grid import parse_grid

    res = CliRunner().invoke(app, ["sweep", "--features", "0123456789ab", "--grid", "dense:hidden=256,dropout=0.5"])
    assert res.exit_code == 2
    line = _error_line(res)
    assert "parameters are separated by ';' and values by ','" in line and "'dense:hidden=256;dropout=0.5'" in line
    assert len(parse_grid("dense:hidden=256;dropout=0.5")) == 1  # the suggestion is a valid grid


def test_bad_data_exits_2_as_the_readme_says(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["extract", "--data", str(tmp_path / "no-such-folder"), "--cache", str(tmp_path / "cache")]
    )
    assert res.exit_code == 2
    assert "no-such-folder" in _error_line(res)


def test_missing_run_hint_works_when_pasted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = CliRunner().invoke(app, ["finetune", "--run", str(tmp_path / "nope"), "--cache", str(cache)])
    line = _error_line(res)
    assert "train-head --out" not in line  # without --features it only said "no features chosen"
    pasted = CliRunner().invoke(app, _pasted(line))
    assert pasted.exit_code == 0, pasted.output


@pytest.mark.slow  # an extraction, a sweep and a real process that tries to download weights
def test_run_hints_sweep_no_plots_and_offline_imagenet(tmp_path: Path) -> None:
    import subprocess
    import sys

    cache = tmp_path / "cache"
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["extract", *SMALL, "-q", "--cache", str(cache)]).exit_code == 0
    assert (
        CliRunner()
        .invoke(
            app,
            [
                "train-head",
                *SMALL,
                "--head",
                "logreg",
                "-p",
                "C=0.5",
                "--out",
                str(run),
                "--no-plots",
                "--cache",
                str(cache),
            ],
        )
        .exit_code
        == 0
    )
    # A run that lost its head: the hint is the run's own train-head command, and it works.
    (run / "head.json").unlink()
    res = CliRunner().invoke(app, ["finetune", "--run", str(run), "--epochs", "0", "--cache", str(cache)])
    words = _pasted(_error_line(res))
    assert (
        words[0] == "train-head"
        and "--features" in words
        and "C=0.5" in words
        and words[words.index("--cache") + 1] == str(cache)
    )
    assert CliRunner().invoke(app, words).exit_code == 0
    assert (run / "head.json").is_file()

    res = CliRunner().invoke(
        app,
        [
            "sweep",
            *SMALL,
            "--grid",
            "logreg:C=1",
            "--no-plots",
            "--out",
            str(tmp_path / "sw"),
            "-q",
            "--cache",
            str(cache),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sw" / "leaderboard.csv").is_file()
    assert not list((tmp_path / "sw").rglob("*.png")) and not list((tmp_path / "sw").rglob("report.html"))

    # Offline (a proxy that refuses), ImageNet weights for features that exist only with random ones.
    args = [a for a in SMALL if a not in ("--weights", "random")]
    env = {
        **os.environ,
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "KERAS_HOME": str(tmp_path / "keras"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "featurecache", "train-head", *args, "--json", "--cache", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stdout == ""  # Keras's "Downloading data from" is not on stdout
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot download ImageNet weights") and "--weights random --size 32" in error, (
        proc.stderr
    )
    assert "mobilenetv2-random-32-avg--digits--" in error

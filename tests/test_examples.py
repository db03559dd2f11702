"""Every script in examples/ runs, exits 0, prints the numbers it promises and saves its picture.

The numbers looked for are recomputed here with plain NumPy from each script's own data (its
module constants), and the seeds' printed numbers are looked for as the seeds write them.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The seed documents' walk-throughs; transformers_generate.py has its own test below.
SCRIPTS = sorted(EXAMPLES.glob("seed*.py"))
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def fmt(values) -> str:
    """Formats numbers as the examples print them (4 fixed decimals, NumPy's brackets)."""
    with np.printoptions(precision=4, suppress=True, floatmode="fixed", linewidth=100):
        return np.array2string(np.asarray(values, dtype=np.float64))


def softmax(s):
    e = np.exp(np.asarray(s, np.float64) - np.max(s, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def constants(script: Path, monkeypatch) -> dict:
    """The script's module-level data, without running its main()."""
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import their _shared helper
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module)


def expect_seed000(c) -> list[str]:
    rows = [fmt(softmax(scores)) for scores, _, _ in c["SEED_SOFTMAX"]]
    x = c["X"]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    w = softmax(unit @ unit.T / math.sqrt(x.shape[1]))
    return [*rows, "= 11000", "Salary = 0*200 + 0.5*2000 + 0.5*20000 + 0*200", fmt(w[1]),
            fmt(w[1] @ x), "the seed prints: [0.03 0.08 0.23 0.64]",
            "the seed prints: [0 0 0.0067 0.99]"]


def expect_seed002(c) -> list[str]:
    x = c["ENCODED"]
    q, k = x @ c["W_Q"], x @ c["W_K"]
    scores = q @ k.T
    w = softmax(scores / math.sqrt(2))
    by_two = softmax(scores / 2)
    return [f"computed       : {scores[0, 0]:.4f}", "the seed prints: -0.09",
            f"computed       : {fmt(w[0])}", "the seed prints: [0.36 0.4 0.24]",
            f"'Write' is {w[0, 0]:.0%} similar to itself, {w[0, 1]:.0%} to 'a', "
            f"{w[0, 2]:.0%} to 'poem'", fmt(w @ (x @ c["W_V"])).splitlines()[0],
            "dividing by 2 instead gives " + ", ".join(f"{p:.0%}" for p in by_two[0])]


def expect_seed003(c) -> list[str]:
    q = c["QUERIES"][c["SITTING"]]
    the, dog = q @ c["KEYS"][c["THE"]], q @ c["KEYS"][c["DOG"]]
    return ["the seed writes = 0.13", "the seed writes = 0.26",
            f"0.03 + 0.12 + 0.06 = {the:.2f}", f"0.06 + 0.16 + 0.07 = {dog:.2f}",
            "sqrt(3) = 1.7321", "softmax(0.13/3) and softmax(0.26/3), divides by d_k = 3",
            f"seed 0.13/3 = {0.13 / 3:.4f}", f"{the:.2f}/sqrt(3) = {the / math.sqrt(3):.4f}",
            fmt(softmax(np.array([0.13, 0.26]) / 3)), fmt(softmax(np.array([the, dog]) / 3)),
            fmt(softmax(np.array([the, dog]) / math.sqrt(3)))]


def expect_seed004(c) -> list[str]:
    n, d, seed = len(c["TOKENS"]), c["D_MODEL"], c["SEED"]
    # The script's data rebuilt from the documented recipes: embeddings drawn from
    # default_rng(seed), the sinusoidal table, Glorot-uniform w_q, w_k, w_v drawn in that order.
    x = np.random.default_rng(seed).standard_normal((n, d))
    pos, col = np.arange(n)[:, None], np.arange(d)[None, :]
    angle = pos / 10000.0 ** ((col - col % 2) / d)
    x = x + np.where(col % 2 == 0, np.sin(angle), np.cos(angle))
    rng, limit = np.random.default_rng(seed), math.sqrt(6 / (d + d))
    w_q, w_k, w_v = (rng.uniform(-limit, limit, (d, d)) for _ in range(3))
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    w_how = softmax(q[0] @ k.T / math.sqrt(d))
    return [f"weights of 'How', fastattn.self_attention: {fmt(w_how)}", fmt(w_how @ v),
            "the seed prints: [0.1 0.2 0.3 0.3 0.1]",
            f"computed       : {fmt(c['SEED_HOW_WEIGHTS'])}", fmt(c["SEED_HOW_WEIGHTS"] @ v),
            "(and equal to them within 1e-12 relative)"]


EXPECTED = {
    "seed000_cosine_attention.py": expect_seed000,
    "seed002_write_a_poem.py": expect_seed002,
    "seed003_dog_on_the_mat.py": expect_seed003,
    "seed004_how_are_you_doing.py": expect_seed004,
}


def test_every_example_has_expectations():
    assert {p.name for p in SCRIPTS} == set(EXPECTED)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_runs_and_prints_its_numbers(script, tmp_path, monkeypatch):
    out_dir = tmp_path / "pictures"  # does not exist yet: the script creates it
    result = subprocess.run([sys.executable, str(script), "--out", str(out_dir)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in EXPECTED[script.name](constants(script, monkeypatch)):
        assert expected in result.stdout, f"{expected!r} not in the output:\n{result.stdout}"
    assert "DISAGREES" not in result.stdout
    png = out_dir / f"{script.stem}.png"
    if HAVE_MATPLOTLIB:
        assert f"heat map saved to {png}" in result.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "skipped: matplotlib is missing" in result.stdout
    assert list(tmp_path.iterdir()) == [out_dir]  # nothing written beside it


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_runs_without_matplotlib(script, tmp_path):
    """With matplotlib unimportable the script still runs, says the picture was skipped, and
    (no --out given) would have saved it in the current directory."""
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.path.insert(0, {str(EXAMPLES)!r}); sys.argv = [{str(script)!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"heat map {script.stem}.png skipped: matplotlib is missing" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.torch
def test_transformers_example_agrees_with_sdpa(tmp_path):
    pytest.importorskip("torch", reason="the example needs torch (fastattn[transformers])")
    pytest.importorskip("transformers", reason="the example needs fastattn[transformers]")
    result = subprocess.run([sys.executable, str(EXAMPLES / "transformers_generate.py")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "same greedy tokens as sdpa: yes" in result.stdout


@pytest.mark.torch
def test_training_example_trains(tmp_path):
    pytest.importorskip("torch", reason="the example needs torch (fastattn[torch])")
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_tiny_transformer.py"),
                             "--steps", "60"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    first, last = (next(ln for ln in lines if ln.startswith(f"{n:4d}   ")) for n in (1, 60))
    f0, s0 = map(float, first.split()[1:])
    f1, s1 = map(float, last.split()[1:])
    assert abs(f0 - s0) < 1e-4  # same seed, same batches: the same first loss
    assert f1 < f0 - 1.0 and s1 < s0 - 1.0  # both fall
    assert abs(f1 - s1) < 0.1  # and fall alike
    assert "sample: 'Beautiful is " in result.stdout


def test_kvcache_example_generates_in_place(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "generate_with_kvcache.py"),
                             "--prompt", "300", "--tokens", "12"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cache: [312, 312] tokens held of 312, written in place (same buffer throughout: " \
           "yes)" in result.stdout
    assert "same tokens: yes" in result.stdout  # as the loop that concatenates
    assert "tokens/s per sequence" in result.stdout


def test_every_script_is_tested():
    tested = {p.name for p in SCRIPTS} | {"transformers_generate.py", "train_tiny_transformer.py",
                                          "generate_with_kvcache.py"}
    assert {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")} == tested

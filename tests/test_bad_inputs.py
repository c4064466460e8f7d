"""Bad inputs get one clear error, not NaN or a silently wrong result: batches (zero rows, a spent generator),
cutoffs (rtol, dims, chunk_size) and damaged checkpoints (every flipped bit the msgpack format can reveal)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import degenjax as dj
from conftest import assert_trees_all_close
from degenjax._src import checkpoints

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4))
PARAMS = {"W1": RNG.normal(size=(4, 5)), "W2": RNG.normal(size=(5, 3))}
MODEL = dj.Sections((lambda p, h: jnp.tanh(h @ p["W1"]), lambda p, h: h @ p["W2"]))


def _gen():
    for i in range(4):
        yield X[16 * i:16 * (i + 1)]


@pytest.fixture(scope="module")
def basis():
    return dj.interaction_basis(MODEL, PARAMS, [X])


def test_generator_batches_are_used_not_consumed_before_use():
    # Streamed from a generator, the activation Gram of node layer 0 is blockdiag(Cov(X), 1) (float64 NumPy).
    g0 = dj.activation_grams(MODEL, PARAMS, _gen())[0]
    want = np.zeros((5, 5))
    want[:4, :4], want[4, 4] = np.cov(X, rowvar=False, bias=True), 1.0
    assert_trees_all_close(g0, want, rtol=1e-12, atol=1e-14)
    b = dj.interaction_basis(MODEL, PARAMS, _gen())
    assert b.dims == (5, 4)
    edges = dj.interaction_edges(MODEL, PARAMS, b, _gen())
    assert edges[0].shape == (4, 5)
    # A spent generator is named as such, not reported as "no data".
    spent = _gen()
    dj.activation_grams(MODEL, PARAMS, spent)
    for fn in (dj.activation_grams, dj.jacobian_grams, dj.interaction_basis, dj.degeneracy_report):
        with pytest.raises(ValueError, match="consumed already"):
            fn(MODEL, PARAMS, spent)


def test_zero_row_batches_are_errors_not_nan(basis):
    empty = X[:0]
    for fn in (dj.activation_grams, dj.jacobian_grams, dj.interaction_basis, dj.degeneracy_report):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: batch 0 has no rows"):
            fn(MODEL, PARAMS, [empty])
        with pytest.raises(ValueError, match="batch 1 has no rows"):
            fn(MODEL, PARAMS, iter([X, empty]))
    with pytest.raises(ValueError, match="batch 0 has no rows"):
        dj.activation_grams(MODEL, PARAMS, empty)  # a single array is one batch
    with pytest.raises(ValueError, match="interaction_edges: batch 0 has no rows"):
        dj.interaction_edges(MODEL, PARAMS, basis, [empty])


@pytest.mark.parametrize("rtol", [-1e-9, 1.0, 2.0, float("nan"), float("inf")])
def test_nonsense_rtol(rtol):
    with pytest.raises(ValueError, match=r"interaction_basis: rtol=.* is not a relative cutoff in \[0, 1\)"):
        dj.interaction_basis(MODEL, PARAMS, [X], rtol=rtol)
    with pytest.raises(ValueError, match=r"degeneracy_report: rtol=.* is not a relative cutoff"):
        dj.degeneracy_report(MODEL, PARAMS, [X], rtol=rtol)
    with pytest.raises(ValueError, match=r"layer_basis: rtol=.* is not a relative cutoff"):
        dj.layer_basis(np.eye(3), np.zeros(3), None, rtol=rtol)


def test_nonsense_dims_and_chunk_sizes(basis):
    with pytest.raises(ValueError, match=r"dims\[0\] = 10 but node layer 0 has 4 non-constant directions"):
        dj.interaction_basis(MODEL, PARAMS, [X], dims=(10, 3))
    with pytest.raises(ValueError, match=r"dims\[1\] = 0 but node layer 1 has 5"):
        dj.interaction_basis(MODEL, PARAMS, [X], dims=(2, 0))
    with pytest.raises(ValueError, match=r"dims\[0\] must be an integer"):
        dj.interaction_basis(MODEL, PARAMS, [X], dims=(2.5, 3))
    with pytest.raises(ValueError, match="interaction_edges: chunk_size must be a positive integer; got 0"):
        dj.interaction_edges(MODEL, PARAMS, basis, [X], chunk_size=0)
    with pytest.raises(ValueError, match="ablated_output: chunk_size must be a positive integer"):
        dj.ablated_output(MODEL, PARAMS, basis, X, 0, np.ones((4, 5)), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        dj.activation_grams(MODEL, PARAMS, [X], chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        dj.jacobian_grams(MODEL, PARAMS, [X], chunk_size=0)


def test_cli_basis_with_a_generator_entry_point(tmp_path, monkeypatch):
    # The basis command uses the entry point's batches twice (basis, then edges): a generator must still work.
    (tmp_path / "gen_problem.py").write_text(
        "import jax.numpy as jnp, numpy as np, degenjax as dj\n"
        "X = np.random.default_rng(0).normal(size=(64, 4))\n"
        "P = {'W1': np.random.default_rng(1).normal(size=(4, 5)), 'W2': np.random.default_rng(2).normal(size=(5, 3))}\n"
        "def make():\n"
        "    model = dj.Sections((lambda p, h: jnp.tanh(h @ p['W1']), lambda p, h: h @ p['W2']))\n"
        "    return model, P, (X[16 * i:16 * (i + 1)] for i in range(4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from degenjax.cli import app

    res = CliRunner().invoke(app, ["basis", "gen_problem:make", "--kind", "pca"])
    assert res.exit_code == 0, res.output
    assert "dims per node layer: [5, 6]" in res.output  # rank 4 + constant, rank 5 + constant


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _params():
    r = np.random.default_rng(3)
    return {"params": {"dense": {"kernel": r.normal(size=(4, 3)).astype(np.float32),
                                 "bias": r.normal(size=(3,)).astype(np.float32)},
                       "count": np.int32(5)}}


def test_checkpoint_leaves_are_checked_against_the_template(tmp_path):
    p = _params()
    template = jax.tree.map(np.zeros_like, p)
    bad = jax.tree.map(np.copy, p)
    bad["params"]["dense"]["bias"][1] = np.nan
    checkpoints.save_msgpack(tmp_path / "nan.msgpack", bad)
    with pytest.raises(ValueError, match=r"leaf \['params'\]\['dense'\]\['bias'\] contains NaN or inf"):
        checkpoints.load_checkpoint(tmp_path / "nan.msgpack", template)
    bad = jax.tree.map(np.copy, p)
    bad["params"]["count"] = np.float32(5.0)  # an integer leaf stored as float
    checkpoints.save_msgpack(tmp_path / "kind.msgpack", bad)
    with pytest.raises(ValueError, match=r"leaf \['params'\]\['count'\] has dtype float32 but the model expects int32"):
        checkpoints.load_checkpoint(tmp_path / "kind.msgpack", template)
    # Another float precision is a legitimate cast (a float32 checkpoint into a float64 model).
    checkpoints.save_msgpack(tmp_path / "ok.msgpack", p)
    t64 = jax.tree.map(lambda a: np.zeros(np.shape(a), np.float64 if a.dtype == np.float32 else a.dtype), p)
    got = checkpoints.load_checkpoint(tmp_path / "ok.msgpack", t64)
    assert got["params"]["dense"]["kernel"].dtype == np.float64
    np.testing.assert_array_equal(got["params"]["dense"]["kernel"], p["params"]["dense"]["kernel"])
    # The content digest changes with the content, not the name.
    d1 = checkpoints.checkpoint_digest(tmp_path / "ok.msgpack")
    (tmp_path / "copy.msgpack").write_bytes((tmp_path / "ok.msgpack").read_bytes())
    assert checkpoints.checkpoint_digest(tmp_path / "copy.msgpack") == d1
    assert checkpoints.checkpoint_digest(tmp_path / "nan.msgpack") != d1


def test_every_flipped_bit_outside_raw_array_data_is_detected(tmp_path):
    """Each single-bit flip of a msgpack checkpoint either raises a ValueError, leaves the parameters identical,
    or changes bytes inside an array's raw data (which the format has no checksum for)."""
    p = _params()
    template = jax.tree.map(np.zeros_like, p)
    path = tmp_path / "c.msgpack"
    checkpoints.save_msgpack(path, p)
    raw = path.read_bytes()
    payload = set()
    for leaf in jax.tree.leaves(p):
        data = np.asarray(leaf).tobytes()
        start = raw.find(data)
        assert start >= 0
        payload.update(range(start, start + len(data)))
    outcomes = {"error": 0, "identical": 0, "raw data": 0}
    for i in range(len(raw)):
        for bit in (0x01, 0x04, 0x80):
            flipped = bytearray(raw)
            flipped[i] ^= bit
            path.write_bytes(bytes(flipped))
            try:
                got = checkpoints.load_checkpoint(path, template)
            except ValueError:
                outcomes["error"] += 1
                continue
            same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)))
            if same:
                outcomes["identical"] += 1
            else:
                assert i in payload, f"flipping bit {bit:#x} of byte {i} (outside array data) loaded silently"
                outcomes["raw data"] += 1
    assert outcomes["error"] > outcomes["raw data"] > 0


def test_damaged_checkpoint_holding_an_undecoded_extension(tmp_path):
    path = tmp_path / "c.msgpack"
    checkpoints.save_msgpack(path, _params())
    raw = bytearray(path.read_bytes())
    i = raw.find(b"\xc7")  # the first ext8 record (an ndarray); its type code follows the length byte
    raw[i + 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        checkpoints.load_checkpoint(path, jax.tree.map(np.zeros_like, _params()))
    with pytest.raises(ValueError, match="damaged"):
        checkpoints.load_checkpoint(path)


def test_unreadable_checkpoint_digest(tmp_path):
    with pytest.raises(ValueError, match="Checkpoint not found"):
        checkpoints.checkpoint_digest(tmp_path / "none.msgpack")
    assert len(checkpoints.checkpoint_digest(pathlib.Path(__file__))) == 64


def test_batches_that_do_not_fit_the_model_or_each_other(basis):
    other = RNG.normal(size=(8, 3))
    for fn in (lambda b: dj.interaction_edges(MODEL, PARAMS, basis, b), lambda b: dj.degeneracy_report(MODEL, PARAMS, b)):
        with pytest.raises(ValueError, match="Section 0|features"):
            fn([X, other])  # mixed feature sizes
        with pytest.raises(ValueError, match="dtypes"):
            fn([X, X.astype(np.float32)])
        with pytest.raises(ValueError, match="complex"):
            fn([X.astype(np.complex64)])
    casting = dj.Sections((lambda p, h: jnp.tanh(h.astype(jnp.float64) @ p["W1"]), MODEL[1]))  # takes int inputs
    with pytest.raises(ValueError, match=r"node layer 0 \(.*\) has dtype int32; edges differentiate"):
        dj.interaction_edges(casting, PARAMS, basis, [X.astype(np.int32)])
    for cs in (2.5, "64", None):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            dj.activation_grams(MODEL, PARAMS, [X], chunk_size=cs)
    with pytest.raises(ValueError, match=r"edge_sparsity: edges\[0\] has NaN, inf or negative entries"):
        dj.edge_sparsity([np.full((3, 3), np.nan)])
    with pytest.raises(ValueError, match="negative"):
        dj.edge_sparsity([-np.ones((3, 3))])


@pytest.mark.parametrize("bad", ["matrix", None, [[1.0, 2.0], [3.0]]])
def test_eigensolvers_name_non_numeric_input(bad):
    with pytest.raises(ValueError, match="must be a numeric"):
        dj.eigh(bad)
    with pytest.raises(ValueError, match="must be a numeric"):
        dj.eigh_topk(bad, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="must be a numeric"):
        dj.spectral_density(bad, key=jax.random.key(0), num_probes=1, num_lanczos=1)


def test_entry_points_that_raise_are_one_line_errors(tmp_path):
    from degenjax._src import sweep

    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "raises_when_called.py").write_text("def make():\n    return {}['missing']\n")
    with pytest.raises(ValueError, match=r"importing module 'raises_at_import' raised RuntimeError: no GPU here"):
        sweep.load_problem("raises_at_import:make", [tmp_path])
    with pytest.raises(ValueError, match=r"'raises_when_called:make' raised KeyError") as info:
        sweep.load_problem("raises_when_called:make", [tmp_path])
    assert isinstance(info.value.__cause__, KeyError)  # the user's traceback stays available


# ---------------------------------------------------------------------------------------------------------------
# estimate_llc: one clear error per bad input, before anything is compiled (issue 15 item 5)

_LX = RNG.normal(size=(64, 3))
_LDATA = (_LX, _LX @ np.array([1.0, -2.0, 0.5]))
_LPARAMS = {"w": np.array([1.0, -2.0, 0.5])}


def _lloss(p, b):
    return jnp.mean((b[0] @ p["w"] - b[1]) ** 2)


def _never_called(*args, **kwargs):
    raise AssertionError("the bad input must be refused before anything runs")


@pytest.mark.parametrize("step_size", [1e-4, "auto"])
@pytest.mark.parametrize("bad, match", [
    (dict(loss_fn=lambda p, b: (b[0] @ p["w"] - b[1]) ** 2),
     r"loss_fn\(params, batch\) must return a floating-point scalar .* float64\[8\] .* jnp\.mean"),
    (dict(params={"w": _LPARAMS["w"], "count": np.int32(3)}), r"params leaf \['count'\] has dtype int32; .*\(cast it"),
    (dict(rng_key=0), r"rng_key must be a PRNG key; got int 0\. Pass jax\.random\.key\(seed\)"),
    (dict(rng_key=np.arange(3)), r"rng_key must be a PRNG key; got an array of dtype int64 and shape \(3,\)"),
    (dict(rng_key=jax.random.split(jax.random.key(0), 2)), r"rng_key must be a single PRNG key; .* shape \(2,\)"),
    (dict(loss_fn=3), r"loss_fn must be callable as loss_fn\(params, batch\); got int"),
])
def test_estimate_llc_bad_inputs_are_one_line_errors(bad, match, step_size, monkeypatch):
    from degenjax._src import llc as llc_lib

    # nothing may be compiled or run for a bad input
    monkeypatch.setattr(llc_lib, "prologue_runner", _never_called)
    monkeypatch.setattr(llc_lib, "chunk_runner", _never_called)
    kw = {"rng_key": jax.random.key(0), "loss_fn": _lloss, "params": _LPARAMS, **bad}
    with pytest.raises(ValueError, match=match) as info:
        dj.estimate_llc(kw["rng_key"], kw["loss_fn"], kw["params"], _LDATA, num_chains=2, num_draws=10,
                        step_size=step_size, batch_size=8)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("step_size", ["1e-4", "Auto", ""])
def test_estimate_llc_step_size_string_other_than_auto(step_size):
    with pytest.raises(ValueError, match=r"step_size must be a positive finite scalar or 'auto'; got '"):
        dj.estimate_llc(jax.random.key(0), _lloss, _LPARAMS, _LDATA, num_chains=2, num_draws=10,
                        step_size=step_size, batch_size=8)


def test_estimate_llc_accepts_a_legacy_uint32_key():
    res = dj.estimate_llc(jax.random.PRNGKey(3), _lloss, _LPARAMS, _LDATA, num_chains=2, num_draws=10,
                          step_size=1e-4, batch_size=8, warn=False)
    assert np.all(np.isfinite(np.asarray(res.loss_trace)))

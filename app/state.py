"""Thin caching wrappers around library calls, and the UI state the pages share.

Everything numerical happens in spectra/ and compressors/; this module only caches
it: st.cache_resource for loaded models and the shared store of compressed modules
(never mutated by a page), st.cache_data for tables and per-setting errors, so no
spectrum or compression is computed twice for the same inputs, across reruns and
sessions. The spectra and sensitivities are also on disk (spectra's own cache).
"""

from __future__ import annotations

import os

import streamlit as st

from spectra.background import AnalysisJob
from spectra.errors import SpectraInputError
from spectra.io import cache, models, roles
from spectra.io.model import open_model
from spectra.plan.defaults import FIRST_CALIB_TOKENS
from spectra.rows import AnalysisSettings


def default_model() -> str:
    return os.environ.get("SPECTRA_APP_MODEL", "demo")


def model_spec() -> str:
    """The model every page works on (chosen on the Model page)."""
    if "model_spec" not in st.session_state:
        st.session_state.model_spec = default_model()
    return st.session_state.model_spec


def checked_model() -> str | None:
    """The chosen model, or None after showing why it cannot be read."""

    spec = model_spec()
    try:
        opened(spec)
        matrix_table(spec)
    except SpectraInputError as e:
        st.error(str(e))
        return None
    return spec


@st.cache_data(show_spinner=False)
def matrix_table(spec: str):
    """One row per 2-D weight (read from file headers, no weights loaded)."""
    import polars as pl

    mats = opened(spec).matrices
    return pl.DataFrame(
        {
            "name": [m.name for m in mats],
            "role": [m.role for m in mats],
            "block": [m.block for m in mats],
            "shape": [f"{m.shape[0]} x {m.shape[1]}" for m in mats],
            "params": [m.shape[0] * m.shape[1] for m in mats],
            "dtype": [m.ref.dtype for m in mats],
        }
    )


@st.cache_data(show_spinner=False)
def summary(spec: str) -> dict:
    """Architecture, sizes, dtype, device and cache status, from config and headers."""

    model = opened(spec)
    source, config, mats = model.source, model.config, model.matrices
    path = source.root / "config.json"
    return dict(
        has_config=path.is_file(),
        storage=models.storage(source),
        converted=models.conversion_info(source),
        architecture=", ".join(config.get("architectures") or [_causal_lm(source.model_type)]),
        model_type=source.model_type or config.get("model_type") or "?",
        layers=config.get("num_hidden_layers") or config.get("n_layer") or "?",
        hidden=config.get("hidden_size") or config.get("n_embd") or "?",
        params=sum(m.shape[0] * m.shape[1] for m in mats),
        matrices=len(mats),
        dtype=", ".join(sorted({DTYPES.get(m.ref.dtype, m.ref.dtype) for m in mats})),
        device=model.device,
        root=str(source.root),
    )


DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _causal_lm(model_type: str | None) -> str:
    """The transformers class a config without `architectures` is loaded as."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "", model_type or "?")


def spectra_job(spec: str) -> AnalysisJob:
    """The model's spectra and metrics (no MPO), computed in the background from the
    first time a page asks, one matrix at a time, each stored as it finishes; shared by
    every session. `table()` has what has arrived, `progress()` how far it is."""
    return _job(spec, *run_options(), str(cache.cache_dir()), None)


def mpo_job(spec: str, cores: int) -> AnalysisJob:
    """The full analysis with MPO bond profiles for K = `cores`, in the background while
    a page that shows them is open (it calls `touch()`)."""
    return _job(spec, *run_options(), str(cache.cache_dir()), cores)


@st.cache_resource(show_spinner=False, max_entries=16)
def _job(spec: str, dtype: str, offload: str, where: str, cores: int | None) -> AnalysisJob:
    model = _opened(spec, dtype, offload)
    if cores is None:
        return AnalysisJob(model, AnalysisSettings(mpo=False)).start()
    return AnalysisJob(model, AnalysisSettings(cores=cores), lease=LEASE_S).start()


LEASE_S = 10.0  # bond profiles pause this long after their page was last drawn


@st.cache_data(show_spinner=False)
def calib_spectra(spec: str, calib_key: str):
    """The activation-aware spectra of the calibration in folder `calib_key` (name,
    calib_sigma, calib_* metrics; only the blocks' modules), to join on `name`."""
    from spectra.data.calib_spectra import calib_table  # deferred: torch
    from spectra.data.calibration import open_folder

    return calib_table(opened(spec), open_folder(calib_key).settings)


def sigmas(spec: str) -> dict:
    """Singular values by module name, of the matrices whose spectra have arrived."""
    return spectra_job(spec).sigmas()


def run_options() -> tuple[str, str]:
    """(dtype, offload) the app runs models with (`spectra app --dtype --offload`)."""
    return (
        os.environ.get("SPECTRA_APP_DTYPE", "auto"),
        os.environ.get("SPECTRA_APP_OFFLOAD", "auto"),
    )


def opened(spec: str):
    """The model resolved once for every session (the app's entry point: the pages
    name it by `spec`, the library takes this object), in the working dtype and
    offload `spectra app` was started with; a model too big for this machine is
    refused here, with one line. Files replaced since it was opened: every cached
    fact about it is dropped, and one message says so (the next run opens the new one)."""
    model = _opened(spec, *run_options())
    before = _stamps(spec, *run_options())
    try:
        now = {f: cache.file_stamp(f) for f in before}
    except OSError:
        now = None
    if now != before:
        for cached in (_opened, _stamps, _job, matrix_table, summary, can_calibrate):
            cached.clear()
        raise SpectraInputError(
            f"{spec}: its files were replaced while the app was running; nothing computed "
            "from the old ones is kept. Rerun the page to open the new weights."
        )
    return model


@st.cache_resource(show_spinner=False)
def _stamps(spec: str, dtype: str, offload: str) -> dict:
    """The model's files as they were when it was opened."""
    return {f: cache.file_stamp(f) for f in _opened(spec, dtype, offload).source.files}


@st.cache_resource(show_spinner=False)
def _opened(spec: str, dtype: str, offload: str):
    return open_model(spec, "auto", dtype, offload)


def loaded(spec: str):
    """(model, tokenizer) for sensitivities and calibration, in the working dtype:
    resident, or streamed from disk one block at a time; shared, never mutated (the
    same one every library call on `opened(spec)` runs)."""
    model = opened(spec)
    return model.shared(), model.tokenizer()


@st.cache_resource(show_spinner=False)
def built_modules(spec: str) -> dict:
    """Compressed modules by (names, config), shared by every session's previewer."""
    return {}


def previewer(spec: str):
    """This session's Previewer on `spec` (its compressed modules shared), reading this
    session's calibration when there is one."""
    from spectra.preview import Previewer  # deferred: torch

    key = f"previewer::{spec}"
    if key not in st.session_state:
        model, tok = loaded(spec)
        if opened(spec).offload == "disk":  # a previewer swaps modules in: its own skeleton
            model = opened(spec).load()
        st.session_state[key] = Previewer(model, tok, built=built_modules(spec))
    pv = st.session_state[key]
    pv.use_calibration(calibration(spec))
    return pv


CALIB_TOKENS = (4096, 8192, 16384, 32768)


def calib_tokens() -> int:
    """The calibration size chosen on the Plan page (the small one of `plan auto` first)."""
    return int(st.session_state.get("calib_size", FIRST_CALIB_TOKENS))


def auto_steps(spec: str, calibrating: bool) -> dict[str, int]:
    """The phases Auto-allocate runs, in order, as their progress names them (for the
    time left over all of them): the calibration's blocks, then one candidate unit per
    linear module (the plan's modules are compressed afterwards, in the background:
    app.views.plan_build). {} for a model that cannot be previewed."""
    if not can_calibrate(spec):
        return {}
    pv = previewer(spec)
    return {"block": len(pv.layers) if calibrating else 0, "candidates": len(pv.targets)}


def calib_settings(spec: str):
    from spectra.data.calibration import for_model

    return for_model(opened(spec), tokens=calib_tokens())


def calibration(spec: str):
    """This model's calibration at the chosen size if it is cached (None if not); looked
    up once per session and size, then remembered."""
    key = f"calibration::{spec}::{calib_tokens()}"
    if key not in st.session_state:
        from spectra.data.calibration import cached

        st.session_state[key] = cached(opened(spec), calib_settings(spec))
    return st.session_state[key]


@st.cache_data(show_spinner=False)
def can_calibrate(spec: str) -> bool:
    """Whether the model has what a calibration needs (a tokenizer)."""
    return opened(spec).has_tokenizer()


def compute_calibration(spec: str, progress=None):
    """Compute (or read) the calibration at the chosen size, with progress."""
    from spectra.data.calibration import calibrate

    grams = calibrate(opened(spec), calib_settings(spec), progress=progress)
    st.session_state[f"calibration::{spec}::{calib_tokens()}"] = grams
    return grams


@st.cache_data(show_spinner=False, max_entries=20000)
def row_error(spec: str, name: str, settings: tuple, calib_key: str | None = None) -> tuple:
    """(weight error, calibration-weighted error or None) of one module under one
    setting (settings as sorted items; `calib_key`: the calibration folder, if any)."""
    # deferred: torch, needed only once a preview, an error or an allocation is asked for
    from compressors.registry import METHODS, make_config
    from spectra.preview import module_errors

    config = make_config(**dict(settings))
    method = METHODS[config.method]
    calib = _module_calibration(spec, name, calib_key)
    sigma = sigmas(spec).get(name) if method.spectral else None
    if calib is None and sigma is not None and method.errors is not None:
        got = method.errors(config, None, sigma, None, None)  # the spectrum suffices
        if got is not None:
            return got
    weight = opened(spec).matrix(name).read()
    curves = None
    if calib is not None and method.curves is not None:  # every rank from one factorization
        whiten = bool(getattr(config, "whiten", True))
        curves = calibrated_curves(spec, name, calib_key, config.method, whiten)
    return module_errors(weight, config, sigma, calib, curves)


def _module_calibration(spec: str, name: str, calib_key: str | None):
    """compressors.base.Calibration of one module from the calibration in `calib_key`."""
    if calib_key is None:
        return None
    block = calibration_block(spec, calib_key, roles.block_of(name))
    if block is None or name not in block:
        return None
    import torch

    from compressors.base import Calibration

    h, rows = block[name]
    return Calibration(h.to(torch.float64), rows)  # this module's H only, for this use


@st.cache_resource(show_spinner=False, max_entries=1)
def calibration_block(spec: str, calib_key: str, block: int | None):
    """One block's Grams of the calibration in folder `calib_key`, float32 as stored (a
    block of 8B shapes: 1 GB; two blocks in float64 were 4 GB beside every action), one
    block kept: a module's H is widened when it is used."""
    from spectra.data.calibration import open_folder

    grams = open_folder(calib_key)
    if grams is None or block is None or block not in grams:
        return None
    return grams[block]


@st.cache_resource(show_spinner=False, max_entries=512)
def calibrated_curves(spec: str, name: str, calib_key: str, method: str, whiten: bool = True):
    """A method's (weight, calibration-weighted) error at every rank under a calibration,
    from one factorization (low rank: whitened from W L's spectrum, plain from W's)."""
    from compressors.registry import METHODS

    weight = opened(spec).matrix(name).read()
    h, _ = calibration_block(spec, calib_key, roles.block_of(name))[name]
    return METHODS[method].curves(weight, h, whiten)


def sensitivity_scores(spec: str, kind: str, tokens: int, progress=None):
    """Per-module sensitivity scores (name, role, block, score) as a table
    (spectra.plan.sensitivity_report, cached on disk by the library); `calib` reads the
    calibration of the chosen size (`tokens` ignored)."""
    from spectra.plan import sensitivity as sens  # deferred: torch
    from spectra.plan import sensitivity_report

    if sens.KINDS[kind].calibrated:
        c = calib_settings(spec)
        settings = sens.SensitivitySettings(kind, c.corpus, c.tokens, c.seqlen)
    else:
        settings = sens.SensitivitySettings(kind=kind, tokens=tokens)
    return sensitivity_report.sensitivity_table(opened(spec), settings, progress=progress)


@st.cache_data(show_spinner=False)
def sensitivity_metrics(spec: str, calib_key: str | None = None):
    """The spectral metrics that `spectra sensitivity --correlate` ranks, per module
    (calib_* ones from the calibration in folder `calib_key`, if any)."""
    from spectra.data.calibration import open_folder
    from spectra.plan import sensitivity_report  # deferred: torch

    grams = open_folder(calib_key) if calib_key else None
    spectra_job(spec).wait()  # the table the library reads is then cached
    return sensitivity_report.metric_table(opened(spec), calibration=grams)


@st.cache_data(show_spinner=False, max_entries=2000)
def block_error(spec: str, block: str, settings: tuple, calib_key: str | None = None) -> dict:
    """{"mlp", "kv"}: the calibration-weighted errors of a width setting (settings as
    sorted items) on `block` (compressors.width.block_errors; None without a
    calibration)."""
    import torch

    from compressors.registry import make_config
    from compressors.width import block_errors
    from spectra.plan.block_plan import heads_of

    config = make_config(**dict(settings))
    model = opened(spec)
    mats = _block_roles(spec, block)
    w = {
        r: torch.from_numpy(mats[r].read()).double()
        for r in ("gate", "up", "down", "q", "k", "v", "o")
    }
    index = roles.block_of(block + ".mlp")
    grams = calibration_block(spec, calib_key, index) if calib_key else None
    h = {n: grams[mats[r].name][0].double() for r, n in (("down", "down"), ("q", "in"))
         if grams is not None and mats[r].name in grams}  # fmt: skip
    return block_errors(w, config, heads_of(model.config)[0], h.get("down"), h.get("in"))


@st.cache_data(show_spinner=False, max_entries=512)
def intermediate_spectrum(spec: str, calib_key: str, block: str) -> tuple | None:
    """(singular values of the block's MLP intermediate activations, their effective
    rank, the MLP's neurons) on the calibration in `calib_key`; None without them."""
    from spectra.plan.width_auto import intermediate_spectrum as spectrum

    down = _block_roles(spec, block).get("down")
    grams = calibration_block(spec, calib_key, roles.block_of(block + ".mlp"))
    if down is None or grams is None or down.name not in grams:
        return None
    s, erank = spectrum(grams[down.name][0])
    return s, erank, down.shape[1]


def _block_roles(spec: str, block: str) -> dict:
    """{role: matrix} of one decoder block, grouped as plans group them."""
    from spectra.plan.block_plan import blocks

    return {m.role: m for m in blocks(opened(spec).matrices).get(block, [])}

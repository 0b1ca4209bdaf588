"""Export page: download the plan, see the `spectra apply` command, export an applied
plan for vLLM, transformers or llama.cpp, import a plan."""

import shlex
from collections import Counter
from pathlib import Path

import streamlit as st
import yaml

from app import state
from app.views import plan_page
from spectra import export as exports
from spectra.errors import SpectraInputError
from spectra.plan import edit as pe
from spectra.plan import format as plans


def render() -> None:
    st.title("Export")
    plan_page.init()
    spec = state.checked_model()
    if spec is None:
        return
    layers = st.session_state.plan_layers
    shape = {m.name: list(m.shape) for m in state.opened(spec).matrices}
    try:  # each entry records its module's shape, so another model's is refused
        plan = plans.parse(
            {
                "version": 1,
                "model": spec,
                # the calibration the Plan page previewed data-aware settings with
                "calibration": dict(vars(state.calib_settings(spec))),
                "layers": {
                    k: {**v, **({"shape": shape[k]} if k in shape else {})}
                    for k, v in layers.items()
                },
            }
        )
    except SpectraInputError as e:
        st.error(str(e))
        return
    width = sum(v["method"] == "width" for v in layers.values())
    what = f"{len(layers) - width} modules" + (f" and {width} blocks (width)" if width else "")
    st.write(f"{what} with explicit settings; every other module stays dense.")
    for col, fmt, mime in zip(
        st.columns(2), ("yaml", "json"), ("application/x-yaml", "application/json"), strict=True
    ):
        col.download_button(
            f"Download plan.{fmt}",
            plans.dumps(plan, fmt),
            f"plan.{fmt}",
            mime,
            key=f"export_{fmt}",
            type="primary" if fmt == "yaml" else "secondary",
        )
    tokens = (st.session_state.preview_history or [{}])[-1].get("tokens", 2048)
    st.code(
        f"spectra plan show plan.yaml --model {shlex.quote(spec)}\n"
        f"spectra apply plan.yaml --model {shlex.quote(spec)} -o compressed\n"
        f"spectra eval compressed --max-tokens {tokens}",
        language="bash",
    )
    run_elsewhere()
    st.subheader("Import a plan")
    upload = st.file_uploader(
        "plan.yaml or plan.json", type=["yaml", "yml", "json"], key="import_file"
    )
    if upload is not None:
        try:
            try:
                data = plans.loads(upload.getvalue().decode())
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise SpectraInputError(f"{upload.name}: not YAML or JSON ({e})") from e
            imported = plans.parse(data)
            mats = [m for m in state.opened(spec).matrices if m.role != "embed"]
            new = pe.layers_from_plan(imported, mats, state.opened(spec))
        except SpectraInputError as e:
            st.error(f"{upload.name}: {e}")
            return
        if st.button(
            f"Load {upload.name} into the Plan page ({len(new)} modules)", key="import_go"
        ):
            plan_page.rebase(new)
            st.success(f"Loaded {len(new)} module settings from {upload.name}.")


def run_elsewhere() -> None:
    """The three export formats of an applied plan, the commands, and the export itself."""
    st.subheader("Run it elsewhere")
    c = st.columns([2, 2, 1])
    out = c[0].text_input("spectra apply output (OUT)", "compressed", key="export_out")
    fmt = c[1].radio("format", exports.FORMATS, horizontal=True, key="export_format")
    kind = c[2].selectbox(
        "GGUF type", exports.GGUF_TYPES, 1, key="export_gguf_type", disabled=fmt != "gguf"
    )
    dest = f"{out}-{fmt}"
    flag = f" --gguf-type {kind}" if fmt == "gguf" else ""
    st.code(
        f"spectra export {shlex.quote(out)} --format {fmt} -o {shlex.quote(dest)}{flag}\n"
        f"spectra eval {shlex.quote(dest)}\n" + exports.SERVE[fmt].format(dir=shlex.quote(dest)),
        language="bash",
    )
    from compressors import io
    from compressors.opened import open_out

    if not io.is_compressed_checkpoint(out):
        st.caption(f"{out} is not a `spectra apply` output yet: run the commands above first.")
        return
    force = st.checkbox(f"replace {dest} if it exists", key="export_force")
    if st.button(f"Export {out} to {dest}", key="export_go", type="primary"):
        try:
            with st.spinner(f"writing {dest}"):
                opened = open_out(out, "cpu")
                summary = exports.export(opened, fmt, dest, kind, force=force)
        except SpectraInputError as e:
            st.error(str(e))
            return
        st.success(
            f"{dest}: {summary['bytes'] / 1e6:.1f} MB in {len(summary['files'])} files "
            f"({summary['seconds']:.1f} s)"
        )
        kinds = Counter((r["stored"], r["reason"] or "") for r in summary["modules"])
        st.dataframe(
            [dict(modules=n, stored=s, reason=r) for (s, r), n in kinds.most_common()],
            hide_index=True,
        )
        st.caption(f"Files: {', '.join(sorted(summary['files']))} in {Path(dest).resolve()}")

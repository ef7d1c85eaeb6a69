"""pytest plugin (entry point `pytest11: sdparity`): the parity gate as test items in a project's suite.

    pytest --sdparity --sdparity-candidate my_pkg.cands:unet --sdparity-dtypes fp32,bf16

Inactive unless `--sdparity` is given: without it the plugin adds its options and the `sdparity`
marker and nothing else, and imports neither torch nor diffusers (this module's top-level
imports are the standard library and pytest only; the harness is imported when asked for).

With `--sdparity` the settings are checked when pytest configures (a bad one: a usage error,
before any work); the gate (parity.gate.run_gate) runs once per session, at collection, and
each row group (parity.junit.row_groups: candidate x component x dtype x mode x scheduler)
becomes one item `sdparity::<component>[<candidate>-<dtype>-<mode>-<scheduler>]`, marked
`sdparity`, that fails with the group's numbers (parity.report.failure_line per failing row).
Every setting is also an ini key (`sdparity_<name>`); the command line wins.

Fixtures for a project's own parity tests: `sdparity_models` (the reference networks,
parity.references.References) and `sdparity_gate` (the run's result, the tolerance table, and
`assert_close` judging a tensor as the gate does); both skip the test without `--sdparity`.
"""
from __future__ import annotations

import re
import time

import pytest

# setting -> (GateSettings.make keyword, kind, help); each is --sdparity-<setting> and ini sdparity_<setting>
SETTINGS = {
    "preset": ("preset", str, "tiny | sd15 | ... (default tiny)"),
    "model": ("model", str, "a local diffusers folder or a single .safetensors/.ckpt file (replaces the preset)"),
    "components": ("components", str, "comma list of text_encoder, vae, unet, scheduler, pipeline, train "
                                      "(default all = every one but train)"),
    "dtypes": ("dtypes", str, "comma list of fp32, fp16, bf16 (default fp32)"),
    "modes": ("modes", str, "pipeline modes (default txt2img,img2img)"),
    "scheduler": ("scheduler", str, "scheduler of the pipeline runs, or 'all' (default pndm)"),
    "device": ("device", str, "cpu | cuda (default cpu)"),
    "steps": ("steps", int, "denoising steps per pipeline run (tiny 4, sd15 2)"),
    "size": ("size", int, "image size in pixels (tiny 64, sd15 256)"),
    "seed": ("seed", int, "base seed (default 0)"),
    "num-seeds": ("num_seeds", int, "seeds per direct network check (default 2)"),
    "tolerances": ("tolerances", str, "a tolerance TOML file replacing parity/tolerances.toml"),
    "informational": ("informational", str, "comma list of candidates reported (xfail) but not gated"),
}
STATE = pytest.StashKey["GateState"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sdparity", "sd-parity: the parity gate against diffusers as test items")
    group.addoption("--sdparity", action="store_true", default=False,
                    help="collect the sd-parity gate as test items (off by default)")
    group.addoption("--sdparity-candidate", action="append", default=None, metavar="NAME_OR_IMPORT_PATH",
                    help="a candidate to gate: a built-in or installed name (see `sdparity candidates`) or "
                         "package.module:factory; repeatable or a comma list (default scratch)")
    parser.addini("sdparity_candidates", "comma list of candidates to gate (as --sdparity-candidate)", default="")
    for name, (_kw, _kind, text) in SETTINGS.items():
        group.addoption(f"--sdparity-{name}", default=None, help=text)
        parser.addini(f"sdparity_{name.replace('-', '_')}", f"as --sdparity-{name}", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sdparity: an sd-parity gate item (pytest --sdparity)")
    if config.getoption("sdparity"):
        config.stash[STATE] = GateState(settings_of(config))


def _value(config: pytest.Config, name: str):
    cli = config.getoption(f"sdparity_{name.replace('-', '_')}")
    if cli is not None:
        return cli
    ini = config.getini(f"sdparity_{name.replace('-', '_')}")
    return ini or None


def _usage(exc: Exception) -> pytest.UsageError:
    """The harness's one-line reason, its option names spelled as this plugin's."""
    text = re.sub(r"--(candidates|candidate)\b", "--sdparity-candidate", str(exc).splitlines()[0] if str(exc) else
                  type(exc).__name__)
    text = re.sub(r"--(" + "|".join(map(re.escape, SETTINGS)) + r")\b", r"--sdparity-\1", text)
    return pytest.UsageError(f"sdparity: {text}")


def settings_of(config: pytest.Config):
    """Checked GateSettings from the options (and ini keys); candidates and the tolerance table
    loaded too, so that a bad one is a usage error before any model is built."""
    from parity.gate import GateSettings, load_candidates
    from parity.tolerances import Table

    kwargs = {}
    for name, (kw, kind, _text) in SETTINGS.items():
        value = _value(config, name)
        if value is None:
            continue
        if kind is int:
            try:
                value = int(value)
            except ValueError:
                raise pytest.UsageError(f"sdparity: --sdparity-{name} must be an integer (got {value!r})") from None
        kwargs[kw] = value
    chosen = [c for v in (config.getoption("sdparity_candidate") or [config.getini("sdparity_candidates")])
              for c in str(v).split(",") if c.strip()]
    try:
        settings = GateSettings.make(candidates=[c.strip() for c in chosen] or ["scratch"], **kwargs)
        Table.load(settings.tolerances)
        load_candidates(settings)
    except (ValueError, OSError) as exc:  # SettingsError, CandidateError, ToleranceError, a missing file
        raise _usage(exc) from None
    return settings


class GateState:
    """The session's gate: the references built once, the run done once (both lazily)."""

    def __init__(self, settings):
        self.settings = settings
        self._refs = None
        self._result = None

    def references(self):
        if self._refs is None:
            from parity.references import quiet_libraries, references_for

            quiet_libraries()
            st = self.settings
            self._refs = references_for(st)
        return self._refs

    def result(self, say=None):
        if self._result is None:
            from parity.gate import run_gate

            refs = self.references() if self.settings.needs_networks else None
            self._result = run_gate(self.settings, progress=say, references=refs)
        return self._result


# --------------------------------------------------------------------------- items
class ParityFailure(AssertionError):
    """A row group over tolerance; its text is the whole failure report."""


class GateCollector(pytest.Collector):
    """`sdparity`: runs the gate (once per session) and yields one item per row group."""

    def collect(self):
        from parity.junit import row_groups

        state: GateState = self.config.stash[STATE]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        verbose = self.config.getoption("verbose") > 0

        def say(msg: str) -> None:
            if reporter is not None and verbose:
                reporter.write_line(f"[sdparity] {msg}")

        st, t0 = state.settings, time.time()
        if reporter is not None:
            reporter.write_line(f"sdparity: running the gate ({st.model or st.preset}; {', '.join(st.candidates)}; "
                                f"{', '.join(st.components)}; {', '.join(st.dtypes)}) ...")
        try:
            groups = row_groups(state.result(say).rows)
        except Exception as exc:  # noqa: BLE001 - one failing item carries it; the session goes on
            return [GateErrorItem.from_parent(self, name="gate", error=exc)]
        if reporter is not None:
            reporter.write_line(f"sdparity: the gate ran in {time.time() - t0:.1f} s: {len(groups)} items")
        return [GroupItem.from_parent(self, name=g.key.name, group=g) for g in groups]


class GroupItem(pytest.Item):
    """One row group: passes, fails with its numbers, skips (every row skipped) or xfails
    (an --sdparity-informational candidate over tolerance)."""

    def __init__(self, *, group, **kw):
        super().__init__(**kw)
        self.group = group
        self.add_marker("sdparity")
        k = group.key
        self.user_properties += [("candidate", k.candidate), ("component", k.component), ("dtype", k.dtype),
                                 ("mode", k.mode), ("scheduler", k.scheduler),
                                 ("comparisons", len(group.compared)), ("over_tolerance", len(group.failing))]

    def runtest(self) -> None:
        g = self.group
        if g.status == "skipped":
            pytest.skip(g.skip_reason)
        if g.status == "informational":
            pytest.xfail(f"informational candidate, not gated: {g.message()}")
        if g.status == "failed":
            raise ParityFailure(g.failure_text())

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"sdparity {self.group.key.name}"


class GateErrorItem(pytest.Item):
    """The gate itself raised: one failing item carrying the error, instead of a crashed session."""

    def __init__(self, *, error: BaseException, **kw):
        super().__init__(**kw)
        self.error = error
        self.add_marker("sdparity")

    def runtest(self) -> None:
        raise self.error

    def reportinfo(self):
        return self.path, None, "sdparity gate"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The session's children get one more: the gate's collector, so its items are collected,
    counted, and selected by -k / -m like any other (`-m sdparity`: the gate only)."""
    report = yield
    if isinstance(collector, pytest.Session) and STATE in collector.config.stash and report.passed:
        report.result.append(GateCollector.from_parent(collector, name="sdparity", nodeid="sdparity"))
    return report


def pytest_report_header(config: pytest.Config):
    state = config.stash.get(STATE, None)
    if state is None:
        return None
    st = state.settings
    return (f"sdparity: {st.model or 'preset ' + st.preset}, candidates {', '.join(st.candidates)}, components "
            f"{', '.join(st.components)}, dtypes {', '.join(st.dtypes)}, modes {', '.join(st.modes)}, "
            f"schedulers {', '.join(st.schedulers)}, device {st.device}")


# --------------------------------------------------------------------------- fixtures
def _state(request) -> GateState:
    state = request.config.stash.get(STATE, None)
    if state is None:
        pytest.skip("sd-parity fixtures need pytest --sdparity")
    return state


@pytest.fixture(scope="session")
def sdparity_models(request):
    """The reference networks of the session's settings (parity.references.References: `.networks`
    holds diffusers' / transformers' text_encoder, vae and unet in fp32 on CPU, `.tokenizer`,
    `.scheduler_config`, `.cfg`); the same objects the gate compares against."""
    return _state(request).references()


@pytest.fixture(scope="session")
def sdparity_gate(request):
    """The session's gate (run once): `.result` (parity.gate.GateResult), `.groups` (the items'
    row groups), `.table` (parity.tolerances.Table) and `.assert_close(...)`."""
    return GateHandle(_state(request))


class GateHandle:
    """What a project's own parity test uses: the run, the tolerance table, and a judgement."""

    def __init__(self, state: GateState):
        self._state = state
        self.settings = state.settings

    @property
    def result(self):
        return self._state.result()

    @property
    def rows(self):
        return self.result.rows

    @property
    def groups(self):
        from parity.junit import row_groups

        return row_groups(self.rows)

    @property
    def table(self):
        from parity.tolerances import Table

        return Table.load(self.settings.tolerances)

    def assert_close(self, component: str, tensor: str, dtype: str, ref, out, fp32_truth=None) -> dict:
        """Judge `out` against `ref` by the table's bar for (component, tensor, dtype), as the gate
        does (fp16/bf16 need `fp32_truth`, the reference's fp32 output); returns the row's numbers
        (parity.tolerances.Verdict.fields) or raises AssertionError carrying them."""
        from parity.tolerances import judge

        if tuple(ref.shape) != tuple(out.shape):
            raise AssertionError(f"{component} {tensor} {dtype}: shape {tuple(out.shape)} != reference "
                                 f"{tuple(ref.shape)}")
        tol = self.table.lookup(component, tensor, dtype)
        verdict = judge(ref, out, tol, dtype, fp32_truth)
        fields = verdict.fields(dtype)
        if not verdict.passed:
            e = verdict.errors
            raise AssertionError(f"{component} {tensor} {dtype} {'x'.join(map(str, out.shape))}: "
                                 f"{_mismatch(ref, out, tol, dtype)}max_abs={e.max_abs:.6g} "
                                 f"rel_l2={e.rel_l2:.6g} psnr={e.psnr_db:.6g} dB; {verdict.reason}")
        return fields


def _mismatch(ref, out, tol, dtype: str) -> str:
    """fp32: how many elements are outside atol + rtol*|ref|, and where the largest difference is."""
    if dtype != "fp32":
        return ""
    r, o = ref.detach().double().cpu(), out.detach().double().cpu()
    diff = (o - r).abs()
    over = int((diff > tol.atol + tol.rtol * r.abs()).sum())
    flat = int(diff.nan_to_num(float("inf")).argmax())
    where = tuple(int(i) for i in _unravel(flat, tuple(r.shape)))
    return (f"{over} of {r.numel()} elements over atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| "
            f"(largest difference at index {where}); ")


def _unravel(flat: int, shape: tuple) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return out[::-1]

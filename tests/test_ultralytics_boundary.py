"""The Ultralytics boundary (:mod:`visionpeft.integrations.ultralytics`): the version check, the copies of
Ultralytics lists checked against the installed Ultralytics, and no private Ultralytics name outside it."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import io
import re
import textwrap
import tokenize
from pathlib import Path

import pytest

import visionpeft
from visionpeft.integrations import ultralytics as ul

ROOT = Path(visionpeft.__file__).parent
BOUNDARY = ROOT / "integrations" / "ultralytics.py"

# Private or version-specific Ultralytics names, as they appear in code (tokens joined by single spaces)
PRIVATE_USES = {
    "_SafeLoad": r"\b_SafeLoad\b",
    "pt_path": r"\. pt_path\b|['\"]pt_path['\"]",
    "legacy flag": r"\. legacy =",
    "class swap": r"\. __class__ =",
    "check_amp replaced": r"\. check_amp =",
    "Model._load/_new": r"\bdef (_load|_new) \(",
    "BaseTrainer private steps": r"\bdef (_setup_train|_close_dataloader_mosaic|_model_train|_handle_nan_recovery) \(",
    "BaseModel._predict_once": r"\bdef _predict_once \(|\. _profile_one_layer\b",
}
# torch's BatchNorm classes are swapped in place too (FrozenBatchNorm2d): no Ultralytics class involved
CLASS_SWAPS_OF_TORCH = {"frozen_norm.py"}


def code_of(path: Path) -> str:
    """The file's tokens joined by spaces, without comments and docstrings (statements that are only a string)."""
    out, statement_start = [], True
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in {tokenize.COMMENT, tokenize.NL}:
            continue
        if tok.type in {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}:
            statement_start = True
            continue
        if not (tok.type == tokenize.STRING and statement_start):
            out.append(tok.string)
        statement_start = False
    return " ".join(out)


def test_no_private_ultralytics_name_outside_the_boundary():
    boundary = code_of(BOUNDARY)
    for what, pattern in PRIVATE_USES.items():  # the patterns find what they look for
        assert re.search(pattern, boundary), f"pattern for {what} matches nothing in the boundary"
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == BOUNDARY:
            continue
        code = code_of(path)
        for what, pattern in PRIVATE_USES.items():
            if what == "class swap" and path.name in CLASS_SWAPS_OF_TORCH:
                continue
            found += [f"{path.relative_to(ROOT.parent)}: {what} ({m.group()!r})" for m in re.finditer(pattern, code)]
    assert not found, "Ultralytics internals used outside visionpeft/integrations/ultralytics.py:\n" + "\n".join(found)


def test_code_of_drops_docstrings_and_comments_only(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""model.pt_path = 1"""\n# x.pt_path = 2\ndef f(m):\n    """_SafeLoad"""\n    m.pt_path = "s"\n')
    assert re.findall(r"\. pt_path\b", code_of(f)) == [". pt_path"] and "_SafeLoad" not in code_of(f)


def test_unsupported_version_is_one_clear_error(monkeypatch):
    with pytest.raises(ImportError) as e:
        ul.check_version("8.3.40")
    message = str(e.value)
    assert "\n" not in message and "8.3.40" in message and f"pip install 'ultralytics{ul.SUPPORTED}'" in message
    # what `import visionpeft` runs: the installed distribution's version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "8.5.0" if name == "ultralytics" else "0")
    with pytest.raises(ImportError, match=re.escape(f"supports ultralytics{ul.SUPPORTED}; found 8.5.0")):
        ul.check_version()


def test_supported_range_bounds():
    assert ul.is_supported(ul.MIN_VERSION) and ul.is_supported(ul.installed_version())
    assert not ul.is_supported(f"{ul.BELOW_VERSION}.0") and not ul.is_supported("8.4.0")
    assert ul.is_supported(f"{ul.MIN_VERSION}.post1")
    ul.check_version()  # the installed Ultralytics passes


def test_pyproject_declares_the_supported_range():
    text = (ROOT.parent / "pyproject.toml").read_text()
    assert f'"ultralytics{ul.SUPPORTED}"' in text


def test_resume_args_are_ultralytics_check_resume_list():
    """RESUME_ARGS copies the `allowed` set of the installed BaseTrainer.check_resume (a local there)."""
    from ultralytics.engine.trainer import BaseTrainer

    from visionpeft.train import run

    tree = ast.parse(textwrap.dedent(inspect.getsource(BaseTrainer.check_resume)))
    allowed = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "allowed" for t in node.targets)]
    assert len(allowed) == 1 and isinstance(allowed[0], ast.Set)
    assert {ast.literal_eval(e) for e in allowed[0].elts} == ul.RESUME_ARGS
    assert {"augmentations", "freeze"} <= ul.RESUME_ARGS and run.RESUME_ARGS is ul.RESUME_ARGS


def test_legacy_checkpoint_globals_are_ultralytics_aliases():
    """Each old name visionpeft accepts is one Ultralytics' restricted loader also maps (``_SafeLoad._build``)."""
    from ultralytics.nn import tasks

    tree = ast.parse(textwrap.dedent(inspect.getsource(tasks._SafeLoad._build)))
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    ours = ul.legacy_checkpoint_globals()
    assert ours.pop("builtins.getattr") is ul.restricted_getattr
    assert set(ours) <= names, sorted(set(ours) - names)


def test_modern_detect_head_leaves_the_class_flag_alone():
    from ultralytics.nn.modules import Detect

    saved = Detect.legacy
    try:
        Detect.legacy = True  # as after parsing a YOLOv8 YAML
        head = ul.modern_detect_head(nc=3, ch=[16, 32])
        assert head.legacy is False and Detect.legacy is True
        assert not isinstance(head.cv3[0][0], type(Detect(nc=3, ch=[16, 32]).cv3[0][0]))  # depthwise branch
    finally:
        Detect.legacy = saved

"""Safe loading: weights only through safetensors or ``torch.load(weights_only=True)``, YAML only through safe
loading, no eval/exec/pickle of user-supplied content, remote code off unless asked for.

(a) A static scan of ``llmrec_dist/`` (AST, not grep: ``model.eval()`` is not ``eval``) that also checks
    itself on snippets it must flag and snippets it must pass.
(b) Functional checks with real hostile files: a checkpoint ``state.pt`` whose pickle would run code, a model
    package whose weights are a pickle, a text encoder whose ``config.json`` points at custom code, and the
    MLflow pyfunc loading with every unpickler disabled. Each payload would create a marker folder if it
    ran; the tests check it never appears (and, once, that the payload is real).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import llmrec_dist
from registry_fixtures import NUM_ITEMS, item_id, item_text, make_package
from text_fixtures import make_tiny_encoder
from mlflow_db import sqlite_uri

SOURCE = Path(llmrec_dist.__file__).resolve().parent

# ============================================================================ (a) static scan
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
               "Loader", "FullLoader", "UnsafeLoader", "Unpickler"}
PICKLE_READERS = {"read_pickle"}  # pandas


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for Attribute(Name('torch'), 'load'); '' when not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _trust_default_ok(value: ast.AST | None) -> bool:
    """A ``trust_remote_code`` field default: ``False`` or a field helper whose default is ``False``."""
    if value is None or _is_false(value):
        return True
    if isinstance(value, ast.Call):
        default = value.args[0] if value.args else _keyword(value, "default")
        return _is_false(default)
    return False


class UnsafeLoadingScan(ast.NodeVisitor):
    """Collects ``(line, problem)`` for every unsafe loading construct in one module."""

    def __init__(self) -> None:
        self.problems: list[tuple[int, str]] = []
        self.torch_load_names = {"torch.load"}
        self.numpy_names = {"np", "numpy"}

    def flag(self, node: ast.AST, problem: str) -> None:
        self.problems.append((node.lineno, problem))

    # imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in UNSAFE_MODULES:
                self.flag(node, f"imports {alias.name}")
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = (node.module or "").split(".")[0]
        if module in UNSAFE_MODULES:
            self.flag(node, f"imports from {node.module}")
        for alias in node.names:
            if module == "yaml" and alias.name in UNSAFE_YAML:
                self.flag(node, f"imports yaml.{alias.name}")
            if module == "torch" and alias.name == "load":
                self.torch_load_names.add(alias.asname or alias.name)
            if module == "builtins" and alias.name in UNSAFE_BUILTINS:
                self.flag(node, f"imports builtins.{alias.name}")
        self.generic_visit(node)

    # yaml.Loader / yaml.FullLoader / yaml.load ... used anywhere (called or passed)
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _dotted(node.value) == "yaml" and node.attr in UNSAFE_YAML:
            self.flag(node, f"uses yaml.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = _dotted(node.func)
        if name in UNSAFE_BUILTINS or name in {f"builtins.{n}" for n in UNSAFE_BUILTINS}:
            self.flag(node, f"calls {name}()")
        if name in self.torch_load_names and not _is_true(_keyword(node, "weights_only")):
            self.flag(node, f"calls {name}() without weights_only=True")
        if name.split(".")[-1] in PICKLE_READERS:
            self.flag(node, f"calls {name}()")
        if name.split(".")[0] in self.numpy_names and name.endswith(".load") and \
                not _is_false(_keyword(node, "allow_pickle")) and _keyword(node, "allow_pickle") is not None:
            self.flag(node, f"calls {name}(allow_pickle=...) with pickles allowed")
        if _is_true(_keyword(node, "trust_remote_code")):
            self.flag(node, "passes trust_remote_code=True")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2 \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "trust_remote_code" \
                and not _is_false(node.args[1]):
            self.flag(node, "reads trust_remote_code with a default other than False")
        self.generic_visit(node)

    # defaults of trust_remote_code: parameters, dataclass fields, dict literals
    def _check_arguments(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args
        positional = args.posonlyargs + args.args
        defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
        pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
        for arg, default in pairs:
            if arg.arg == "trust_remote_code" and default is not None and not _is_false(default):
                self.flag(node, f"{node.name}(trust_remote_code=...) defaults to something other than False")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._check_arguments(node)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code" \
                and not _trust_default_ok(node.value):
            self.flag(node, "field trust_remote_code defaults to something other than False")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "trust_remote_code" and _is_true(node.value):
                self.flag(node, "sets trust_remote_code = True")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                self.flag(node, "sets 'trust_remote_code': True")
        self.generic_visit(node)


def scan(source: str) -> list[tuple[int, str]]:
    visitor = UnsafeLoadingScan()
    visitor.visit(ast.parse(source))
    return visitor.problems


def test_package_source_has_no_unsafe_loading():
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20  # the whole package was found
    found = [f"{path.relative_to(SOURCE.parent)}:{line}: {problem}"
             for path in files for line, problem in scan(path.read_text(encoding="utf-8"))]
    assert not found, "unsafe loading in llmrec_dist:\n" + "\n".join(found)


def test_trust_remote_code_is_off_by_default():
    from llmrec_dist.config import ModelConfig, load_config

    assert ModelConfig().trust_remote_code is False
    assert load_config(None, require_data_path=False).model.trust_remote_code is False


@pytest.mark.parametrize("snippet", [
    "import pickle", "import cloudpickle as cp", "from dill import loads", "import marshal",
    "from pickle import Unpickler", "import joblib",
    "eval(text)", "exec(code)", "builtins.eval('1')", "from builtins import exec",
    "yaml.load(text)", "yaml.load(text, Loader=yaml.Loader)", "yaml.unsafe_load(text)", "yaml.full_load(t)",
    "yaml.safe_load(t, Loader=yaml.FullLoader)", "from yaml import load", "from yaml import UnsafeLoader",
    "torch.load(path)", "torch.load(path, weights_only=False)", "torch.load(path, weights_only=flag)",
    "from torch import load\nload(path)", "from torch import load as tl\ntl(p)",
    "pd.read_pickle(path)", "np.load(path, allow_pickle=True)",
    "AutoModel.from_pretrained(name, trust_remote_code=True)",
    "def load(name, trust_remote_code=True): pass", "def load(name, *, trust_remote_code=None): pass",
    "class C:\n    trust_remote_code: bool = True", "class C:\n    trust_remote_code: bool = setting(True, 'doc')",
    "options = {'trust_remote_code': True}", "settings.get('trust_remote_code', True)",
    "trust_remote_code = True",
])
def test_the_scan_flags(snippet):
    assert scan(textwrap.dedent(snippet)), f"not flagged: {snippet!r}"


@pytest.mark.parametrize("snippet", [
    "model.eval()", "self.lm.eval()", "yaml.safe_load(text)", "yaml.safe_dump(data)",
    "torch.load(path, map_location='cpu', weights_only=True)", "np.load(path)", "np.load(path, allow_pickle=False)",
    "load_file(path)", "json.loads(text)", "AutoModel.from_pretrained(name, trust_remote_code=trust)",
    "def load(name, trust_remote_code=False): pass", "def load(name, trust_remote_code: bool): pass",
    "class C:\n    trust_remote_code: bool = setting(False, 'doc')",
    "options = {'trust_remote_code': flag}", "settings.get('trust_remote_code', False)",
])
def test_the_scan_passes(snippet):
    assert scan(snippet) == []


# ============================================================================ (b) functional
class _Payload:
    """Pickles as a call to ``os.mkdir(marker)``: whoever unpickles it runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickled_payload(path: Path, marker: Path) -> Path:
    torch.save({"weights": torch.zeros(2), "epoch": 3, "payload": _Payload(marker)}, path)
    return path


def test_the_payload_is_real(tmp_path):
    """Unpickling the payload without the weights-only guard does run it (so the checks below mean something)."""
    path = _pickled_payload(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(path, weights_only=False)  # the unsafe call this package never makes
    assert (tmp_path / "ran").is_dir()


def test_checkpoint_state_with_code_is_refused(tmp_path):
    from llmrec_dist.worker.checkpoint import STATE_FILE, read_state

    marker = tmp_path / "ran"
    _pickled_payload(tmp_path / STATE_FILE, marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_state(tmp_path)
    assert not marker.exists()
    # What training does save (tensors, numbers, lists, dicts) still loads.
    torch.save({"epoch": 3, "best_value": 0.5, "history": [{"epoch": 0, "loss": 1.0}],
                "optimizer": {"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [{"lr": 0.1}]}},
               tmp_path / STATE_FILE)
    assert read_state(tmp_path)["epoch"] == 3


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("safe"))


@pytest.mark.parametrize("how", ["pickle_renamed_to_safetensors", "pickle_bin_instead"])
def test_package_with_pickled_weights_is_refused(package, tmp_path, capsys, how):
    from llmrec_dist.cli import main as cli_main
    from llmrec_dist.saved_model import load_model
    from llmrec_dist.registry.recommender import Recommender

    marker = tmp_path / "ran"
    folder = Path(shutil.copytree(package, tmp_path / "package"))
    if how == "pickle_renamed_to_safetensors":
        _pickled_payload(folder / "model.safetensors", marker)
        error, message = ValueError, r"model\.safetensors: not a safetensors weights file .*never unpickled"
    else:
        (folder / "model.safetensors").unlink()
        _pickled_payload(folder / "pytorch_model.bin", marker)
        error, message = FileNotFoundError, r"is not a model package: it lacks model\.safetensors"
    with pytest.raises(error, match=message):
        Recommender.from_folder(folder)
    if how == "pickle_renamed_to_safetensors":
        with pytest.raises(ValueError, match=message):  # offline evaluation reads weights the same way
            load_model(folder)
    assert cli_main(["recommend", "--model", str(folder), "--history", item_id(1)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


def test_training_checkpoint_with_pickled_weights_is_refused(tmp_path):
    from llmrec_dist.worker.checkpoint import read_weights

    marker = tmp_path / "ran"
    _pickled_payload(tmp_path / "model.safetensors", marker)
    with pytest.raises(Exception, match="(?i)header|deserializ"):  # safetensors refuses; nothing unpickled
        read_weights(tmp_path / "model.safetensors")
    assert not marker.exists()


def _custom_code_encoder(folder: Path, marker: Path) -> Path:
    """A tiny BERT folder whose config.json sends AutoModel to custom code that creates ``marker``."""
    texts = [item_text(i) for i in range(1, NUM_ITEMS + 1)]
    make_tiny_encoder(folder, texts)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llmrec-hostile",
                  auto_map={"AutoConfig": "custom.HostileConfig", "AutoModel": "custom.HostileModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(textwrap.dedent(f"""\
        import os
        os.makedirs({str(marker)!r}, exist_ok=True)
        from transformers import BertConfig, BertModel

        class HostileConfig(BertConfig):
            model_type = "llmrec-hostile"

        class HostileModel(BertModel):
            config_class = HostileConfig
        """))
    return folder


def test_text_encoder_with_custom_code_is_refused_by_default(tmp_path):
    from llmrec_dist.config import ModelConfig
    from llmrec_dist.text_tower import load_text_encoder, prepare_text_features

    marker = tmp_path / "ran"
    encoder = _custom_code_encoder(tmp_path / "encoder", marker)
    with pytest.raises(ValueError, match="needs its own Python code; set model.trust_remote_code=true only"):
        load_text_encoder(str(encoder))
    cfg = ModelConfig(item_repr="text", text_encoder=str(encoder))
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="needs its own Python code"):
        prepare_text_features(cfg, ["a text"])
    assert not marker.exists()


def test_text_encoder_custom_code_runs_only_when_allowed(tmp_path):
    """The flag is the gate: with model.trust_remote_code=true the same folder's code does run. (In a
    separate process with its own module cache, so the custom module stays out of this session.)"""
    marker = tmp_path / "ran"
    encoder = _custom_code_encoder(tmp_path / "encoder", marker)
    code = f"from llmrec_dist.text_tower import load_text_encoder\nload_text_encoder({str(encoder)!r}, True)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"),
                                 "HF_HUB_OFFLINE": "1"})
    assert marker.is_dir(), result.stderr[-2000:]


def test_text_encoder_pickled_weights_are_not_unpickled(tmp_path):
    """A text encoder shipping pytorch_model.bin instead of safetensors: transformers loads it with
    torch.load(weights_only=True), so a pickle that would run code is refused."""
    from llmrec_dist.text_tower import load_text_encoder

    marker = tmp_path / "ran"
    folder = make_tiny_encoder(tmp_path / "encoder", [item_text(i) for i in range(1, 4)])
    (folder / "model.safetensors").unlink()
    _pickled_payload(folder / "pytorch_model.bin", marker)
    # torch.load(weights_only=True) refuses it, and the error says so in one line
    with pytest.raises(ValueError, match="refused the weights in .*Weights only load failed.*use safetensors"):
        load_text_encoder(str(folder))
    assert not marker.exists()


def test_package_asking_for_remote_code_is_refused_unless_allowed(package, tmp_path, capsys):
    from llmrec_dist.cli import main as cli_main
    from llmrec_dist.saved_model import load_model
    from llmrec_dist.registry.recommender import Recommender

    folder = Path(shutil.copytree(package, tmp_path / "package"))
    meta = json.loads((folder / "model.json").read_text())
    meta["model"]["trust_remote_code"] = True
    (folder / "model.json").write_text(json.dumps(meta))
    for load in (Recommender.from_folder, load_model):
        with pytest.raises(ValueError, match="model.trust_remote_code is true: loading this model would run"):
            load(folder)
    assert cli_main(["recommend", "--model", str(folder), "--history", item_id(1)]) == 2
    assert "model.trust_remote_code is true" in capsys.readouterr().err
    # An explicit opt-in is honoured (this ID-only model has no encoder code to run anyway).
    assert Recommender.from_folder(folder, trust_remote_code=True).num_items == NUM_ITEMS
    assert cli_main(["recommend", "--model", str(folder), "--history", item_id(1), "--trust-remote-code"]) == 0


def test_yaml_config_tags_do_not_run(tmp_path):
    from llmrec_dist.config import ConfigError, load_raw_yaml
    from llmrec_dist.sweep.search import load_sweep

    marker = tmp_path / "ran"
    for name, text in [("obj.yaml", f"data: !!python/object/apply:os.mkdir [{str(marker)!r}]\n"),
                       ("name.yaml", "train: !!python/name:os.system\n"),
                       ("module.yaml", "model: !!python/module:os\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_raw_yaml(tmp_path / name)
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_sweep(str(tmp_path / name))
    assert not marker.exists()


def _forbid_unpickling(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    try:
        import cloudpickle
    except ImportError:
        return
    for name in ("load", "loads"):
        monkeypatch.setattr(cloudpickle, name, refuse)


def test_pyfunc_loads_from_code_without_unpickling(package, tmp_path, monkeypatch):
    import mlflow

    from llmrec_dist.registry.pyfunc import MODEL_CODE_FILE, _MODEL_CODE, log_model_package
    from llmrec_dist.tracking import use_tracking_uri
    from llmrec_dist.tracking import end_run, start_run

    uri = sqlite_uri(tmp_path / 'mlflow.db')
    run_id = start_run(uri, "safe-loading")
    model_uri = log_model_package(package, uri, run_id)
    end_run(uri, run_id)
    with use_tracking_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "download")))
    stored = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [p for p in stored if p.endswith((".pkl", ".pickle", ".pt", ".bin", ".joblib"))], stored
    assert (local / MODEL_CODE_FILE).read_text() == _MODEL_CODE  # the only code that runs: 3 lines, imports us
    assert "python_model.pkl" not in (local / "MLmodel").read_text()

    _forbid_unpickling(monkeypatch)
    with use_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict(pd.DataFrame({"history": [[item_id(1), item_id(2)]], "k": [3]}))
    assert len(out["item_ids"].iloc[0]) == 3


def test_a_runs_uri_is_read_from_mlflow_not_refused_as_a_path(tmp_path):
    """resolve_model_folder takes runs:/ID/PATH as an MLflow URI (it refused it as "not a folder" before):
    an unknown run is MLflow's error, not ours."""
    import mlflow

    from llmrec_dist.saved_model import is_model_uri, resolve_model_folder

    assert is_model_uri("runs:/abc/model") and is_model_uri("models:/rec@champion") and is_model_uri("s3://b/m")
    assert not is_model_uri("runs/abc/model")
    with pytest.raises(mlflow.exceptions.MlflowException):
        resolve_model_folder("runs:/0123456789abcdef/model", f"sqlite:///{tmp_path / 'mlflow.db'}")

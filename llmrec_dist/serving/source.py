"""Which model a ``--model`` names, which version an alias points to now, and loading that version.

``models:/NAME@ALIAS`` is followed: :meth:`ModelSource.current_version` asks the registry where the alias
points, and :meth:`ModelSource.load` loads that version *by number* (``models:/NAME/VERSION``), so the
version reported is exactly the one loaded even if the alias moves meanwhile. ``models:/NAME/VERSION``
is one fixed version; a local model-package folder or another MLflow URI (``runs:/...``) is served as
it is and never changes.

Serving is for next-item models: a rating/click model or a chain is refused with an error that says so.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrec_dist.serving.requests import OPTIONS

_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")
_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")


class ModelSourceError(ValueError):
    """The model cannot be served: it does not resolve, does not load, or is not a next-item model."""


@dataclass
class Loaded:
    """A loaded next-item model and where it came from."""

    servable: Any  # llmrec_dist.registry.recommender.Recommender
    name: str  # registered model name, or the folder / URI served
    version: str  # registered version ("" for a folder or another URI)
    options: dict[str, bool] = field(default_factory=dict)  # which of OPTIONS its recommend() takes
    loaded_at: float = field(default_factory=time.time)


def supported_options(recommend) -> dict[str, bool]:
    """``{"exclude": bool, "diversity": bool, "explain": bool}``: the keyword arguments ``recommend`` takes."""
    try:
        params = inspect.signature(recommend).parameters
    except (TypeError, ValueError):
        return {name: False for name in OPTIONS}
    return {name: name in params for name in OPTIONS}


class ModelSource:
    """A ``--model`` value with the registry it is looked up in."""

    def __init__(self, uri: str, tracking_uri: str, trust_remote_code: bool = False,
                 diversity_space: str = "model", text_encoder: str = ""):
        self.uri = uri.strip()
        self.tracking_uri = tracking_uri
        self.trust_remote_code = trust_remote_code
        self.diversity_space, self.text_encoder = diversity_space, text_encoder  # applied to each load
        self.name, self.alias, self.version = self.uri, "", ""
        if match := _ALIAS_URI.fullmatch(self.uri):
            self.kind, self.name, self.alias = "alias", match["name"], match["alias"]
        elif match := _VERSION_URI.fullmatch(self.uri):
            self.kind, self.name, self.version = "version", match["name"], match["version"]
        elif "://" not in self.uri and ":/" not in self.uri:
            self.kind = "folder"
            self.uri = self.name = str(Path(self.uri).expanduser().resolve())
        else:
            self.kind = "uri"

    @property
    def follows_alias(self) -> bool:
        return self.kind == "alias"

    def current_version(self) -> str:
        """The version to serve now: where the alias points (asks the registry), the fixed version, or ""
        for a folder / other URI. Raises :class:`ModelSourceError` when the alias or model does not exist;
        other registry errors (unreachable server) propagate as they are."""
        if self.kind != "alias":
            return self.version
        from mlflow.exceptions import MlflowException

        from llmrec_dist.tracking import client

        try:
            found = client(self.tracking_uri).get_model_version_by_alias(self.name, self.alias)
        except MlflowException as err:
            if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ModelSourceError(f"{self.uri}: no alias {self.alias!r} on a registered model {self.name!r} "
                                       f"in {self.tracking_uri}") from None
            raise
        return str(found.version)

    def check(self) -> str:
        """Cheap checks before anything starts: the alias / version exists in the registry, the folder is a
        next-item model package. Returns the version that would be served."""
        if self.kind == "folder":
            self._check_folder(Path(self.uri))
            return ""
        if self.kind == "version":
            from mlflow.exceptions import MlflowException

            from llmrec_dist.tracking import client

            try:
                client(self.tracking_uri).get_model_version(self.name, self.version)
            except MlflowException:
                raise ModelSourceError(f"{self.uri}: no version {self.version} of a registered model {self.name!r} "
                                       f"in {self.tracking_uri}") from None
        return self.current_version()

    @staticmethod
    def _check_folder(folder: Path) -> None:
        from llmrec_dist.registry.pyfunc import package_kind
        from llmrec_dist.registry.reranker import CHAIN_FILE
        from llmrec_dist.saved_model import RECOMMENDER_FILE

        if not folder.is_dir():
            raise ModelSourceError(f"{folder}: no such folder, and not an MLflow model URI "
                                   "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model)")
        if (folder / RECOMMENDER_FILE).is_file() or (folder / CHAIN_FILE).is_file():
            kind = package_kind(folder)
            if kind != "retriever":
                raise ModelSourceError(_not_next_item(str(folder), "a chain" if kind == "chain" else
                                                      "a rating or click model"))

    def load(self, version: str | None = None) -> Loaded:
        """Load ``version`` (default: :meth:`current_version`) and check it is a next-item model."""
        from llmrec_dist.registry.loading import load_servable
        from llmrec_dist.registry.recommender import Recommender
        from llmrec_dist.registry.reranker import Chain, Reranker

        version = self.current_version() if version is None else str(version)
        uri = f"models:/{self.name}/{version}" if self.kind in ("alias", "version") else self.uri
        servable, _ = load_servable(uri, self.tracking_uri, self.trust_remote_code, "--model")
        if isinstance(servable, Chain):
            raise ModelSourceError(_not_next_item(uri, "a chain"))
        if isinstance(servable, Reranker):
            raise ModelSourceError(_not_next_item(uri, f"a {servable.task} model"))
        if not isinstance(servable, Recommender):
            raise ModelSourceError(f"{uri}: not an llmrec_dist next-item model; serve loads models that "
                                   "llmrec-dist train registered, or their package folders")
        try:
            servable.use_diversity_space(self.diversity_space, self.text_encoder)
        except (OSError, ValueError) as err:
            raise ModelSourceError(f"{uri}: serve.diversity_space={self.diversity_space}: "
                                   f"{' '.join(str(err).split())}") from None
        return Loaded(servable, self.name, version, supported_options(servable.recommend))

    def describe(self) -> dict:
        return {"uri": self.uri, "name": self.name, "alias": self.alias or None,
                "follows_alias": self.follows_alias}


def _not_next_item(uri: str, what: str) -> str:
    return (f"{uri} is {what}: serve answers next-item requests (a history in, items out) and needs a "
            "next-item model; serve the retriever, or use `llmrec-dist recommend --rerank` for a chain")

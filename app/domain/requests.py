"""What a client asks for: a merge job, a Hub adapter, a Hub dataset (pydantic; the HTTP bodies and the job
record the worker reads back).

A merge request's `params` are validated by the chosen method's parameter model from the torch-free catalogue
(`sstmerge_core.methods.catalog`), so a method added there is accepted, validated and documented here
without a change to this package. The stored request keeps `params` as the client sent them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from sstmerge_core.jobspec import EvaluationSettings, RepairSpec
from sstmerge_core.methods.catalog import CATALOG, REPAIRS, parse_params
from sstmerge_core.schedules import SCALE_BOUND
from sstmerge_core.search.space import SearchSettings
from sstmerge_core.untrusted import quote

from .errors import InvalidInput

HF_ADAPTER = r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$"
HF_DATASET = r"^hf://(datasets/)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$"
# ids of adapters, datasets and jobs as clients may send them (the server makes `ad_<32 hex>` and the like)
RESOURCE_ID = r"^[A-Za-z0-9_.:-]{1,64}$"
_RESOURCE_ID = re.compile(RESOURCE_ID)
# names: printable, no control characters (NUL included)
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]*$"
ResourceId = Annotated[str, StringConstraints(pattern=RESOURCE_ID)]
# characters that change how a name looks without being seen: bidi controls (the RTL override U+202E, the
# isolates, LRM/RLM/ALM) and zero-width ones (U+200B-U+200D, the word joiner and invisible operators, the BOM)
INVISIBLE = "\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
DISPLAY = f"^[^\x00-\x1f\x7f-\x9f{INVISIBLE}]*$"
DisplayName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=DISPLAY)]
ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=PRINTABLE)]
MAX_ADAPTERS = 16
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
DEFAULT_METHOD = "sst"
UNKNOWN_METHOD = "unknown_method"


class AdapterSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(pattern=HF_ADAPTER, max_length=300, examples=["hf://org/my-lora@main"])
    name: DisplayName | None = None


class DatasetSource(BaseModel):
    """A Hub dataset with a column mapping; its rows are copied into storage as JSONL at creation."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(pattern=HF_DATASET, max_length=300, examples=["hf://datasets/org/prompts@main"])
    split: str = Field(default="train", pattern=r"^[\w.\[\]:%+-]{1,100}$")
    prompt_column: ColumnName = "prompt"
    response_column: ColumnName | None = "response"
    limit: int | None = Field(default=None, ge=1, le=1_000_000)
    name: DisplayName | None = None


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: ResourceId
    weight: float = Field(
        default=1.0, ge=-SCALE_BOUND, le=SCALE_BOUND, allow_inf_nan=False, description="w of w·ΔW, within ±100"
    )


class EvaluationRequest(EvaluationSettings):
    """Held-out evaluation sets (dataset ids) and generation/judging settings (§5)."""

    harmful_dataset_id: ResourceId
    benign_dataset_id: ResourceId
    utility_eval_dataset_id: ResourceId


def _known_method(name: str) -> str:
    if name not in CATALOG:
        raise PydanticCustomError(UNKNOWN_METHOD, "unknown method {name}", {"name": quote(name)})
    return name


def well_formed_id(ident: str) -> bool:
    """Whether `ident` could be the id of a stored adapter, dataset or job (bounded, no NUL or other odd
    characters): a malformed id is simply not found, without asking the database."""
    return _RESOURCE_ID.match(ident) is not None


MethodName = Annotated[str, AfterValidator(_known_method)]


class MergeRequest(BaseModel):
    """A merge job as submitted (README.md, "The service"). `params` must fit the parameter model of `method`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        min_length=1,
        max_length=300,
        pattern=PRINTABLE,
        description="a name from GET /models or a Hub id `org/name[@revision]`",
    )
    utility_adapters: list[AdapterRef] = Field(default_factory=list, max_length=MAX_ADAPTERS)
    safety_adapter: AdapterRef
    utility_dataset_id: ResourceId | None = None
    safety_dataset_id: ResourceId | None = None
    method: MethodName = Field(default=DEFAULT_METHOD, description="a method of GET /methods")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="the parameters of `method` (its JSON Schema is in GET /methods); unknown keys are an error",
    )
    evaluation: EvaluationRequest | None = None
    compare_with: list[MethodName] = Field(
        default_factory=list, max_length=len(CATALOG), description="baseline methods, run with defaults"
    )
    repair: RepairSpec | None = Field(
        default=None,
        description="a post-merge repair step applied to every merged model (docs/repair.md): `refusal_ablation` "
        "reads the safety, harmless and borderline datasets; `calibration` the safety and borderline datasets, and "
        "the utility and harmless datasets when given",
    )
    harmless_dataset_id: ResourceId | None = Field(default=None, description="repair: harmless prompts B")
    borderline_dataset_id: ResourceId | None = Field(default=None, description="repair: borderline-benign prompts P")
    search: SearchSettings | None = Field(
        default=None,
        description="search merge recipes within the tolerances instead of merging `method` at its α sweep "
        "(docs/search.md); needs `evaluation`, whose search split scores the trials",
    )
    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        pattern=PRINTABLE,
        description="where the job's end (`job.succeeded`, `job.failed`, `job.cancelled`) is POSTed, signed per "
        "Standard Webhooks with the tenant's secret (GET /webhooks/secret); the host must be allowed by the "
        "service (`webhook_host_not_allowed`)",
    )

    @model_validator(mode="after")
    def _inputs_fit_the_job(self) -> MergeRequest:
        if self.repair is not None:
            needed = [f"{key.removesuffix('_data')}_dataset_id" for key in REPAIRS[self.repair.method].needs]
            missing = [key for key in needed if not getattr(self, key)]
            if missing:
                raise ValueError(f"repair {self.repair.method!r} needs {', '.join(missing)}")
        elif self.search is None and (self.harmless_dataset_id or self.borderline_dataset_id):
            raise ValueError("harmless_dataset_id and borderline_dataset_id are inputs of a repair or a search")
        elif self.harmless_dataset_id and not self.borderline_dataset_id:
            raise ValueError("a search's harmless_dataset_id needs borderline_dataset_id (every repair step reads P)")
        if self.search is not None and self.evaluation is None:
            raise ValueError("a search needs `evaluation`: its trials are scored on the search split")
        if self.search is not None and (self.compare_with or self.repair is not None):
            raise ValueError("a search chooses the method and the repair itself: drop compare_with and repair")
        return self

    @field_validator("params")
    @classmethod
    def _params_fit_method(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Validated by the method's model; its errors are located under `params` (an unknown method is
        reported on its own)."""
        if "method" in info.data:
            parse_params(info.data["method"], params)
        return params

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The schema ties `params` to `method`: a named schema per catalogue method's parameter model, and `if`
        method is m `then` params follow m's model. `anyOf`, not `oneOf`, for the list: `{}` fits every method."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        # generate_inner registers each model as a definition and returns its $ref (handler() would inline it); the
        # handler pydantic passes is a GenerateJsonSchemaHandler, whose generator the public protocol does not declare
        generate = handler.generate_json_schema.generate_inner  # type: ignore[attr-defined]
        models = {name: generate(info.params.__pydantic_core_schema__) for name, info in CATALOG.items()}
        properties = schema["properties"]
        properties["method"]["enum"] = list(CATALOG)
        properties["compare_with"]["items"]["enum"] = list(CATALOG)
        properties["params"] = {
            "anyOf": list(models.values()),
            "default": {},
            "description": properties["params"]["description"],
        }
        schema["allOf"] = [
            {
                "if": {"properties": {"method": {"const": name}}, "required": ["method"]},
                "then": {"properties": {"params": ref}},
            }
            for name, ref in models.items()
        ]
        return schema

    def adapter_refs(self) -> list[AdapterRef]:
        return [*self.utility_adapters, self.safety_adapter]

    def dataset_ids(self) -> list[str]:
        ids = [self.utility_dataset_id, self.safety_dataset_id, self.harmless_dataset_id, self.borderline_dataset_id]
        if self.evaluation:
            ev = self.evaluation
            ids += [ev.harmful_dataset_id, ev.benign_dataset_id, ev.utility_eval_dataset_id]
        return [i for i in ids if i]


def method_error(
    errors: Sequence[Mapping[str, Any]], request: object, root: tuple[str | int, ...] = ()
) -> InvalidInput | None:
    """The domain error for a merge request whose only problems are its method(s) or its `params`:
    `unknown_method` (naming the known methods) or `invalid_params` (every error, located under `params`);
    None when anything else is wrong too (`params` that is not an object is a malformed body). `root` is where
    the request sits in the errors' `loc`."""
    params_loc = (*root, "params")

    def ours(error: Mapping[str, Any]) -> bool:
        if error["type"] == UNKNOWN_METHOD:
            return True
        loc = tuple(error["loc"])
        return loc[: len(params_loc)] == params_loc and not (loc == params_loc and error["type"] == "dict_type")

    if not errors or not all(ours(e) for e in errors):
        return None
    unknown = [e for e in errors if e["type"] == UNKNOWN_METHOD]
    if unknown:
        return InvalidInput(unknown[0]["msg"], code="unknown_method", details={"methods": sorted(CATALOG)})
    method = request.get("method", DEFAULT_METHOD) if isinstance(request, dict) else DEFAULT_METHOD
    details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    return InvalidInput(f"invalid params for method {method!r}", code="invalid_params", details=details)

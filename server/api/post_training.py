"""The spec's PostTraining API: validate a request (model, datasets and their columns,
configs), turn it into a training recipe, queue it as a job; report status, stream logs,
cancel, list artifacts. Jobs run in worker processes (llama_engine.training.jobs)."""

from __future__ import annotations

import asyncio
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from llama_engine.datasets import (DatasetRegistry, DatasetSourceError, DatasetValidationError,
                                   detect_format, load_checked_rows)
from llama_engine.datasets.columns import PREFERENCE, SFT as SFT_COLUMNS, check_trainer_columns
from llama_engine.datasets.source import file_url_path
from llama_engine.config import ModelConfig
from llama_engine.errors import RecipeError
from llama_engine.training.jobs import (FINISHED, JobExistsError, JobManager, JobNotFoundError,
                                        JobRecord, job_dir)
from llama_engine.training.loop import DPO, SFT, DPOParams, TrainingOptions
from llama_engine.training.checkpoint import ADAPTER_CONFIG_FILE
from llama_engine.training.lora import LoRASpec
from llama_engine.training.recipe import (ADAPTER_ALGORITHMS, FULL, DataSource, Recipe,
                                          adapter_start)
from llama_engine.training.tokenization import DEFAULT_MAX_SEQ_LEN
from server.api.datasets import dataset_error, lookup
from server.api.errors import APIError, ConflictError, NotFoundError
from server.schemas import post_training as pt

LOG_POLL_INTERVAL_S = 0.25
DATASET_ID_KEY = "dataset_id"
# Extra knobs the spec leaves to the free-form configs: name -> (type, lower bound).
HYPERPARAMS: dict[str, tuple[type, Optional[float]]] = {
    "seed": (int, None), "warmup_steps": (int, 0), "max_seq_len": (int, 1),
    "max_grad_norm": (float, 0), "use_rslora": (bool, None)}
LOGGER_OPTIONS: dict[str, tuple[type, Optional[float]]] = {"checkpoint_every_n_steps": (int, 1)}
# The request field that sets each recipe option (a RecipeError's field, see request_field).
REQUEST_FIELDS = {
    **{name: f"training_config.{name}" for name in (
        "n_epochs", "batch_size", "shuffle", "n_iters", "dtype", "fsdp_cpu_offload")},
    "fsdp": "training_config.memory_efficient_fsdp_wrap",
    "activation_checkpointing": "training_config.enable_activation_checkpointing",
    **{name: f"optimizer_config.{name}" for name in ("optimizer_type", "lr", "lr_min", "weight_decay")},
    **{name: f"algorithm_config.{name}" for name in (
        "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "rank", "alpha",
        "reward_clip", "gamma")},
    "beta": "algorithm_config.reward_scale", "label_smoothing": "algorithm_config.epsilon",
    **{name: f"hyperparam_search_config.{name}" for name in HYPERPARAMS},
    **{name: f"logger_config.{name}" for name in LOGGER_OPTIONS},
}


def request_field(option: str) -> str:
    """The request field that sets a recipe option: dtype is training_config.dtype, beta
    algorithm_config.reward_scale; an option no field sets (the server's own) keeps its name."""
    return REQUEST_FIELDS.get(option, option)


def _registered_columns(registered: dict[str, str], requested: dict[str, str], field: str,
                        dataset_id: str) -> dict[str, str]:
    """The columns a job reads from a registered dataset: those the request names (each must
    be one of the dataset's, of the same type), or all of the dataset's when it names none.
    Raises APIError naming the column."""
    for name, kind in requested.items():
        if registered.get(name) != kind:
            has = ", ".join(f"{n} ({t})" for n, t in registered.items())
            raise APIError(f"{field}.columns.{name}: dataset {dataset_id!r} has no {kind} column "
                           f"{name!r}; its columns: {has}", param=f"{field}.columns.{name}")
    return dict(requested or registered)


def _refused(e: RecipeError) -> APIError:
    """A refused recipe as a 400 naming the request field that set the option."""
    return APIError(e.render(request_field), param=request_field(e.field))


def _timestamp(seconds: Optional[float]) -> Optional[datetime]:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


def _checked_options(values: dict[str, Any], known: dict[str, tuple[type, Optional[float]]],
                     field: str) -> dict[str, Any]:
    for name, value in values.items():
        if name not in known:
            raise APIError(f"{field}.{name}: unknown option; known: {', '.join(known)}",
                           param=f"{field}.{name}")
        kind, lower = known[name]
        if kind is bool:
            if not isinstance(value, bool):
                raise APIError(f"{field}.{name}: expected true or false, got {value!r}",
                               param=f"{field}.{name}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise APIError(f"{field}.{name}: expected {kind.__name__}, got {value!r}",
                           param=f"{field}.{name}")
        if lower is not None and value < lower:
            raise APIError(f"{field}.{name}: must be at least {lower}", param=f"{field}.{name}")
    return {name: known[name][0](value) for name, value in values.items()}


def _file_url_path(url: str, field: str) -> Path:
    try:
        path = file_url_path(url)
    except ValueError:
        raise APIError(f"{field}: must be a file:// URL of a checkpoint on this server",
                       param=field) from None
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a path the OS refuses (a NUL byte, too long)
        exists = False
    if not exists:
        raise APIError(f"{field}: {path} does not exist", param=field)
    return path


class PostTrainingService:
    def __init__(self, jobs: JobManager, datasets: DatasetRegistry,
                 training_base: Callable[[str], tuple[str, ModelConfig]],
                 fsdp_nproc_per_node: int = 1):
        self.jobs, self.datasets = jobs, datasets
        # a served model's name -> (its GGUF file or HF folder, its architecture)
        self.training_base = training_base
        # processes (ranks) torch's launcher starts for a memory_efficient_fsdp_wrap job
        self.fsdp_nproc_per_node = fsdp_nproc_per_node

    # ---- requests -> recipes ------------------------------------------------------------
    def _data_source(self, dataset: pt.Dataset, field: str, task: str, folder: Path,
                     name: str) -> DataSource:
        """The dataset as a file beside the job (deleting a registered dataset later does not
        break a queued job) with its columns: a registered one (metadata dataset_id), or the
        content_url fetched now and checked."""
        dataset_id = dataset.metadata.get(DATASET_ID_KEY)
        try:
            if dataset_id is not None:
                record = lookup(self.datasets, str(dataset_id), f"{field}.metadata.{DATASET_ID_KEY}")
                columns = _registered_columns(record.columns, dict(dataset.columns), field,
                                              str(dataset_id))
                data, fmt = record.content_path.read_bytes(), record.format
            else:
                content, _ = load_checked_rows(dict(dataset.columns), dataset.content_url,
                                               self.datasets.max_bytes, self.datasets.timeout_s)
                columns, data, fmt = dict(dataset.columns), content.data, detect_format(content)
            check_trainer_columns(columns, task)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{name}.{fmt}"
            path.write_bytes(data)
            source = DataSource(str(path), columns)
        except NotFoundError as e:  # a bad reference inside the body: the request is at fault
            raise APIError(e.message, param=e.param) from None
        except (DatasetSourceError, DatasetValidationError) as e:
            raise dataset_error(e, field) from None
        return source

    def _options(self, request: pt.TrainingRequest, objective: str,
                 dpo: DPOParams) -> tuple[TrainingOptions, int]:
        hyper = _checked_options(request.hyperparam_search_config, HYPERPARAMS, "hyperparam_search_config")
        logger = _checked_options(request.logger_config, LOGGER_OPTIONS, "logger_config")
        o, t = request.optimizer_config, request.training_config
        options = TrainingOptions(
            objective=objective, n_epochs=t.n_epochs, batch_size=t.batch_size, shuffle=t.shuffle,
            n_iters=t.n_iters, optimizer_type=o.optimizer_type, lr=o.lr, lr_min=o.lr_min,
            weight_decay=o.weight_decay, warmup_steps=hyper.get("warmup_steps"),
            max_grad_norm=hyper.get("max_grad_norm"), seed=hyper.get("seed", 0),
            checkpoint_every_n_steps=logger.get("checkpoint_every_n_steps"), dpo=dpo)
        return options, hyper.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)

    def _recipe(self, request: pt.TrainingRequest, objective: str, model_path: str, algorithm: str,
                algorithm_config: Optional[dict], dpo: DPOParams,
                adapter_path: Optional[str] = None) -> Recipe:
        t = request.training_config
        try:
            options, max_seq_len = self._options(request, objective, dpo)
        except RecipeError as e:
            raise _refused(e) from None
        task = SFT_COLUMNS if objective == SFT else PREFERENCE
        folder = job_dir(self.jobs.state_dir, request.job_uuid)
        try:
            train = self._data_source(request.dataset, "dataset", task, folder / "data", "train")
            validation = self._data_source(request.validation_dataset, "validation_dataset", task,
                                           folder / "data", "validation")
        except APIError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            return Recipe(objective=objective, model_path=model_path, train=train,
                          output_dir=str(folder / "checkpoints"), options=options,
                          validation=validation, algorithm=algorithm,
                          algorithm_config=algorithm_config, adapter_path=adapter_path,
                          max_seq_len=max_seq_len,
                          activation_checkpointing=t.enable_activation_checkpointing,
                          dtype=t.dtype, fsdp=t.memory_efficient_fsdp_wrap,
                          fsdp_cpu_offload=t.fsdp_cpu_offload,
                          nproc_per_node=self.fsdp_nproc_per_node if t.memory_efficient_fsdp_wrap else 1)
        except RecipeError as e:  # the request's fields do not go together
            shutil.rmtree(folder, ignore_errors=True)
            raise _refused(e) from None

    def _submit(self, job_uuid: str, recipe: Recipe) -> None:
        try:
            self.jobs.store.create(job_uuid, {"recipe": recipe.to_json(), "output_dir": recipe.output_dir})
        except JobExistsError as e:
            raise ConflictError(f"job_uuid: {e}", param="job_uuid") from None

    def _refuse_duplicate(self, job_uuid: str) -> None:
        if self.jobs.store.exists(job_uuid):
            raise ConflictError(f"job_uuid: job {job_uuid!r} already exists", param="job_uuid")

    async def supervised_fine_tune(self, request: pt.PostTrainingSFTRequest) -> pt.PostTrainingJob:
        def submit() -> None:
            self._refuse_duplicate(request.job_uuid)
            model_path, architecture = self.training_base(request.model)
            config = request.algorithm_config.model_dump()
            config["use_rslora"] = request.hyperparam_search_config.get("use_rslora", False)
            if request.algorithm.value in ADAPTER_ALGORITHMS:
                try:  # refused now rather than in the job, before its adapters take memory
                    LoRASpec.from_config(request.algorithm.value, config,
                                         config["use_rslora"]).check_fits(architecture)
                except RecipeError as e:
                    raise _refused(e) from None
            recipe = self._recipe(request, SFT, model_path, request.algorithm.value, config,
                                  DPOParams())
            self._submit(request.job_uuid, recipe)
        await asyncio.to_thread(submit)
        return pt.PostTrainingJob(job_uuid=request.job_uuid)

    async def preference_optimize(self, request: pt.PostTrainingRLHFRequest) -> pt.PostTrainingJob:
        def submit() -> None:
            self._refuse_duplicate(request.job_uuid)
            path = _file_url_path(request.finetuned_model, "finetuned_model")
            c = request.algorithm_config
            try:
                dpo = DPOParams(beta=c.reward_scale, reward_clip=c.reward_clip,
                                label_smoothing=c.epsilon, gamma=c.gamma)
            except RecipeError as e:
                raise _refused(e) from None
            if (path / ADAPTER_CONFIG_FILE).exists():  # go on training the adapter
                try:
                    start = adapter_start(path)
                except ValueError as e:
                    raise APIError(f"finetuned_model: {e}", param="finetuned_model") from None
                recipe = self._recipe(request, DPO, start.model_path, start.algorithm, None, dpo,
                                      adapter_path=str(path))
            else:
                recipe = self._recipe(request, DPO, str(path), FULL, None, dpo)
            self._submit(request.job_uuid, recipe)
        await asyncio.to_thread(submit)
        return pt.PostTrainingJob(job_uuid=request.job_uuid)

    # ---- jobs ---------------------------------------------------------------------------
    def _job(self, job_uuid: str) -> JobRecord:
        try:
            return self.jobs.store.get(job_uuid)
        except JobNotFoundError as e:
            raise NotFoundError(f"job_uuid: {e}", param="job_uuid") from None

    @staticmethod
    def _checkpoints(job: JobRecord) -> list[pt.Checkpoint]:
        # absolute(): a job recorded under a relative --state-dir before it was made absolute
        return [pt.Checkpoint(iters=iters, path=path.absolute().as_uri())
                for iters, path in job.checkpoints]

    async def status(self, query: pt.JobQuery) -> pt.PostTrainingJobStatusResponse:
        job = await asyncio.to_thread(self._job, query.job_uuid)
        return pt.PostTrainingJobStatusResponse(
            job_uuid=job.job_uuid, status=job.status, scheduled_at=_timestamp(job.scheduled_at),
            started_at=_timestamp(job.started_at), completed_at=_timestamp(job.completed_at),
            resources_allocated=job.resources, checkpoints=self._checkpoints(job))

    async def artifacts(self, query: pt.JobQuery) -> pt.PostTrainingJobArtifactsResponse:
        job = await asyncio.to_thread(self._job, query.job_uuid)
        return pt.PostTrainingJobArtifactsResponse(job_uuid=job.job_uuid,
                                                   checkpoints=self._checkpoints(job))

    async def cancel(self, query: pt.JobQuery) -> None:
        try:
            await asyncio.to_thread(self.jobs.cancel, query.job_uuid)
        except JobNotFoundError as e:
            raise NotFoundError(f"job_uuid: {e}", param="job_uuid") from None

    async def logs(self, query: pt.JobQuery) -> AsyncIterator[pt.PostTrainingJobLogStream]:
        """One event per log record (every job has at least its 'scheduled' record), until
        the job has finished and every record has been sent."""
        await asyncio.to_thread(self._job, query.job_uuid)  # 404 before the stream opens
        last_id = 0
        while True:
            finished = (await asyncio.to_thread(self._job, query.job_uuid)).status in FINISHED
            rows = await asyncio.to_thread(self.jobs.store.logs_after, query.job_uuid, last_id)
            for row_id, record in rows:
                last_id = row_id
                yield pt.PostTrainingJobLogStream(job_uuid=query.job_uuid, log_lines=[record])
            if finished and not rows:
                return
            if not rows:
                await asyncio.sleep(LOG_POLL_INTERVAL_S)

"""The pipeline's configuration: the schema (``schema``), profiles and overrides (``profiles``), and each
stage's settings view, the part of the config a stage reads and its cache key holds (``views``)."""

from rlhf_core.config.profiles import (PROFILES_DIR, PROJECT_ROOT, apply_overrides, load_config, parse_override,
                                       profile_path, profile_purposes, validate_config)
from rlhf_core.config.schema import (
    ConfigError, Section, StorageConfig, SourceConfig, PtxConfig, DataConfig, ModelSpec, ModelsConfig,
    LoraConfig, DeepSpeedConfig, OptimizerConfig, TrainStageConfig, SFTConfig, RewardConfig,
    ActorCriticTrainConfig, GenerationConfig, KLConfig, RLConfig, EMAConfig, MixtureConfig,
    HybridEngineConfig, EvalConfig, ExportConfig, LoggingConfig, ResourcesConfig, ScheduleConfig, PipelineConfig)

__all__ = [
    "ActorCriticTrainConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "EMAConfig", "EvalConfig",
    "ExportConfig", "GenerationConfig", "HybridEngineConfig", "KLConfig", "LoggingConfig", "LoraConfig", "MixtureConfig",
    "ModelSpec", "ModelsConfig", "OptimizerConfig", "RLConfig", "PROFILES_DIR", "PROJECT_ROOT",
    "PipelineConfig", "PtxConfig", "ResourcesConfig", "RewardConfig", "SFTConfig", "ScheduleConfig",
    "Section", "SourceConfig", "StorageConfig", "TrainStageConfig", "apply_overrides", "load_config",
    "parse_override", "profile_path", "profile_purposes", "validate_config"]

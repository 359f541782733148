"""Typed run configuration: one `RunConfig` describes one run completely; its YAML replays it.

    cfg = load_config("experiments/digits_sfd.yaml", ["student.nfe=3", "loss.name=l2"])
    settings = to_settings(cfg, num_classes=teacher.num_classes)

Overrides are `dotted.key=value` with YAML-typed values (`student.afs=false`, `sfdv.num_steps_choices=[4,5]`,
`teacher.path=null`). Every error is a `ConfigError` naming the field, the bad value and what is allowed, and
is raised by `load_config` / `validate` before anything (run, study, file) is created. A resolved config
dumped with `dump_yaml` loads back to an equal config.

The package by job: `schema` (the dataclasses and the algorithms, see there), `coercion` (a value as the
schema's type), `loading` (YAML, merge, dotted overrides), `validation` (one check per section, then the
algorithm's rules) and `settings` (the adapter to the distillation core).
"""
from sfd.config.coercion import coerce, shown, type_name
from sfd.config.loading import (dump_yaml, flatten, flatten_updates, from_dict, load_config, merge, parse_override,
                                read_yaml, replace, save_yaml, set_value, to_dict)
from sfd.config.schema import (ALGORITHMS, COMPILE_MODES, ROW_REF_PREFIX, SAVED_STUDENT_KEYS, TRAINING_ALGORITHMS,
                               VANILLA_DATA, ConfigError, EvalConfig, EvaluateConfig, LogConfig, LossConfig,
                               OptimConfig, RunConfig, SecondStageConfig, SFDVConfig, SolverConfig, StudentConfig,
                               TeacherConfig, VanillaConfig, all_keys, field_types, is_section)
from sfd.config.settings import grid_spec, to_settings
from sfd.config.validation import validate

__all__ = [
    "ALGORITHMS", "COMPILE_MODES", "ROW_REF_PREFIX", "SAVED_STUDENT_KEYS", "TRAINING_ALGORITHMS", "VANILLA_DATA",
    "ConfigError", "EvalConfig", "EvaluateConfig", "LogConfig", "LossConfig", "OptimConfig", "RunConfig", "SecondStageConfig",
    "SFDVConfig", "SolverConfig", "StudentConfig", "TeacherConfig", "VanillaConfig",
    "all_keys", "coerce", "dump_yaml", "field_types", "flatten", "flatten_updates", "from_dict", "grid_spec",
    "is_section", "load_config", "merge", "parse_override", "read_yaml", "replace", "save_yaml", "set_value",
    "shown", "to_dict", "to_settings", "type_name", "validate",
]

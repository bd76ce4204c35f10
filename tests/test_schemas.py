"""Every record module: the pyarrow schema and the frozen dataclass agree, and rows round-trip."""
from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import pkgutil
import typing

import pyarrow as pa
import pytest

import schemas
from schemas._base import PROVENANCE_NAMES, Record, SchemaViolation, from_table, to_table


def _record_modules():
    out = []
    for m in pkgutil.iter_modules(schemas.__path__):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"schemas.{m.name}")
        classes = [v for v in vars(mod).values()
                   if isinstance(v, type) and issubclass(v, Record) and v is not Record and v.__module__ == mod.__name__]
        if hasattr(mod, "SCHEMA"):
            out.append((m.name, mod, classes))
    return out


MODULES = _record_modules()


def test_there_are_record_modules():
    names = {m for m, _, _ in MODULES}
    assert {"videos", "clips"} <= names


@pytest.mark.parametrize("name,mod,classes", MODULES, ids=[m for m, _, _ in MODULES])
def test_schema_and_dataclass_agree(name, mod, classes):
    assert len(classes) >= 1, f"schemas.{name} declares no Record dataclass"
    cls = classes[0]
    assert cls.__dataclass_params__.frozen
    field_names = [f.name for f in dataclasses.fields(cls)]
    assert set(field_names) == set(mod.SCHEMA.names), (
        f"{name}: only in dataclass {set(field_names) - set(mod.SCHEMA.names)}, "
        f"only in schema {set(mod.SCHEMA.names) - set(field_names)}")
    assert mod.SCHEMA.names[-len(PROVENANCE_NAMES):] == list(PROVENANCE_NAMES)
    for k in getattr(mod, "KEY", ()):
        assert k in mod.SCHEMA.names
        assert not mod.SCHEMA.field(k).nullable, f"{name}: key column {k} must be non-null"
    # Required (no default) dataclass fields are exactly the non-nullable own columns.
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in PROVENANCE_NAMES:
            continue
        optional = type(None) in typing.get_args(hints[f.name])
        assert optional == mod.SCHEMA.field(f.name).nullable, f"{name}.{f.name}: Optional vs nullable disagree"


def _value_for(t: pa.DataType, i: int):
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return f"v{i}"
    if pa.types.is_boolean(t):
        return bool(i % 2)
    if pa.types.is_integer(t):
        return i
    if pa.types.is_floating(t):
        return i + 0.5
    if pa.types.is_timestamp(t):
        return dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        n = t.list_size if pa.types.is_fixed_size_list(t) else 2
        return [_value_for(t.value_type, i + j) for j in range(n)]
    if pa.types.is_struct(t):
        return {t.field(j).name: _value_for(t.field(j).type, i) for j in range(t.num_fields)}
    if pa.types.is_map(t):
        return [(_value_for(t.key_type, i), _value_for(t.item_type, i))]
    raise NotImplementedError(str(t))


@pytest.mark.parametrize("name,mod,classes", MODULES, ids=[m for m, _, _ in MODULES])
def test_round_trip(name, mod, classes):
    cls = classes[0]
    row = {f.name: _value_for(f.type, 3) for f in mod.SCHEMA}
    row["status"] = "ok"
    rec = cls(**row)
    table = to_table([rec], mod.SCHEMA)
    assert table.schema.equals(mod.SCHEMA, check_metadata=False)
    back = from_table(table, cls)[0]
    assert to_table([back], mod.SCHEMA).equals(table)


def test_validation_names_the_problem():
    from schemas.clips import SCHEMA, Clip

    ok = Clip(clip_id="c", video_id="v", video_path="/x", scene_index=0, part_index=0, start_frame=0,
              end_frame=10, start_s=0.0, end_s=1.0, duration_s=1.0, stage="scenes", expert="x", config_hash="h",
              created_at=dt.datetime.now(dt.timezone.utc))
    to_table([ok], SCHEMA)
    with pytest.raises(SchemaViolation, match="status"):
        to_table([dataclasses.replace(ok, status="fine")], SCHEMA)
    with pytest.raises(SchemaViolation, match="config_hash"):
        to_table([dataclasses.replace(ok, config_hash=None)], SCHEMA)

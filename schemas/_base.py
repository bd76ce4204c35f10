"""Common parts of every record type: provenance columns, status values, table conversion.

A record module declares ``SCHEMA`` (pyarrow, with :data:`PROVENANCE_FIELDS` last), ``KEY`` (the columns
that identify a row) and a frozen, keyword-only dataclass subclassing :class:`Record`. The dataclass and the
schema must agree field for field (``tests/test_schemas.py`` checks every module).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any, Iterable, Sequence, TypeVar

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_SKIPPED)

PROVENANCE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("stage", pa.string(), nullable=False),
    pa.field("expert", pa.string(), nullable=False),
    pa.field("expert_revision", pa.string()),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
)
PROVENANCE_NAMES = tuple(f.name for f in PROVENANCE_FIELDS)


def record_schema(fields: Sequence[pa.Field], *, name: str) -> pa.Schema:
    """A record schema: its own fields followed by the provenance columns."""
    own = [f.name for f in fields]
    clash = set(own) & set(PROVENANCE_NAMES)
    if clash:
        raise ValueError(f"{name}: fields {sorted(clash)} are reserved provenance columns")
    return pa.schema(list(fields) + list(PROVENANCE_FIELDS), metadata={b"motionforge.record": name.encode()})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """Provenance and outcome of one row. Stages fill ``status``/``error``; the runner fills the rest."""

    stage: str = ""
    expert: str = ""
    expert_revision: str | None = None
    config_hash: str = ""
    created_at: _dt.datetime | None = None
    status: str = STATUS_OK
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


R = TypeVar("R", bound=Record)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class SchemaViolation(ValueError):
    pass


def to_table(rows: Iterable[Record], schema: pa.Schema) -> pa.Table:
    """Rows -> table with exactly ``schema``; raises :class:`SchemaViolation` naming the bad column."""
    dicts = [_plain(r) for r in rows]
    names = set(schema.names)
    for i, d in enumerate(dicts):
        extra = set(d) - names
        if extra:
            raise SchemaViolation(f"row {i}: fields {sorted(extra)} are not in the schema {schema.names}")
        if d.get("status") not in STATUSES:
            raise SchemaViolation(f"row {i}: status {d.get('status')!r} is not one of {STATUSES}")
    try:
        table = pa.Table.from_pylist(dicts, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaViolation(f"rows do not fit the schema: {exc}") from exc
    validate_table(table, schema)
    return table


def validate_table(table: pa.Table, schema: pa.Schema) -> None:
    if not table.schema.equals(schema, check_metadata=False):
        raise SchemaViolation(f"table schema differs from the declared one:\n{table.schema}\n!=\n{schema}")
    for f in schema:
        if not f.nullable and table.column(f.name).null_count:
            raise SchemaViolation(f"column {f.name!r} is declared non-null but has {table.column(f.name).null_count} nulls")


def from_table(table: pa.Table, cls: type[R]) -> list[R]:
    names = {f.name for f in dataclasses.fields(cls)}
    return [cls(**{k: v for k, v in row.items() if k in names}) for row in table.to_pylist()]


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()

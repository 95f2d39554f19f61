"""The plan catalog: which Dodo products grant which features, limits and credits.

Loaded once at start from TOML (DESIGN §9) and validated strictly: a bad catalog stops the process with a message
naming the file and the key, rather than silently granting or denying access later.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

from service.domain.decimals import MATH, decimal_text
from service.domain.errors import ConfigurationError
from service.domain.values import FeatureKind

DEFAULT_GRACE_PERIOD_DAYS = 7
EXAMPLE_CATALOG = Path(__file__).resolve().parent.parent / "catalog.example.toml"


class CatalogError(ConfigurationError):
    """The catalog file is unreadable or inconsistent; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class CreditDef:
    key: str
    dodo_credit_entitlement_id: str | None = None
    overage_limit: Decimal = Decimal(0)
    rollover: bool = False
    # Each consumption is also recorded as a usage event of this name (for a Dodo meter), amount as `amount`.
    dodo_meter_event: str | None = None
    # CREDITS_LOW fires when the balance falls to or below this: a fixed amount, or (percent) a share of the
    # account's last grant. None: never.
    low_balance: LowBalanceThreshold | None = None


@dataclass(frozen=True, slots=True)
class LowBalanceThreshold:
    amount: Decimal
    percent_of_last_grant: bool = False

    def resolve(self, last_grant: Decimal | None) -> Decimal | None:
        """The threshold in credits; None when it is a share of a grant and there has been no grant."""
        if not self.percent_of_last_grant:
            return self.amount
        if last_grant is None:
            return None
        return MATH.divide(MATH.multiply(last_grant, self.amount), Decimal(100))

    def text(self) -> str:
        return f"{decimal_text(self.amount)}%" if self.percent_of_last_grant else decimal_text(self.amount)


@dataclass(frozen=True, slots=True)
class Plan:
    product_id: str
    name: str
    features: frozenset[str] = frozenset()
    limits: Mapping[str, int] = field(default_factory=dict)
    credits: Mapping[str, Decimal] = field(default_factory=dict)
    trial_credits: Mapping[str, Decimal] = field(default_factory=dict)
    grace_period_days: int | None = None

    def includes(self, feature: str) -> bool:
        return (
            feature in self.features
            or feature in self.limits
            or feature in self.credits
            or feature in self.trial_credits
        )


@dataclass(frozen=True, slots=True)
class Catalog:
    plans: Mapping[str, Plan]
    credits: Mapping[str, CreditDef] = field(default_factory=dict)
    grace_period_days: int = DEFAULT_GRACE_PERIOD_DAYS
    feature_kinds: Mapping[str, FeatureKind] = field(default_factory=dict)
    # Features and credits that must not be granted from a last-known snapshot while Postgres is unreachable
    # (`on_outage = "deny"`); every other one is served from it, marked stale, for a bounded time.
    deny_on_outage: frozenset[str] = frozenset()
    source: str = "<memory>"

    def plan(self, product_id: str) -> Plan | None:
        return self.plans.get(product_id)

    def grace_days(self, product_id: str) -> int:
        plan = self.plans.get(product_id)
        if plan is not None and plan.grace_period_days is not None:
            return plan.grace_period_days
        return self.grace_period_days

    def serves_stale(self, feature: str) -> bool:
        return feature not in self.deny_on_outage

    def kind_of(self, feature: str) -> FeatureKind | None:
        return self.feature_kinds.get(feature)

    def credit_for_entitlement(self, credit_entitlement_id: str) -> CreditDef | None:
        for credit in self.credits.values():
            if credit.dodo_credit_entitlement_id == credit_entitlement_id:
                return credit
        return None


def load_catalog(path: Path | str) -> Catalog:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalog file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read catalog: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from None
    return parse_catalog(raw, source=str(path))


def parse_catalog(raw: Mapping[str, Any], *, source: str = "<memory>") -> Catalog:
    p = _Parser(source)
    unknown = set(raw) - {"grace_period_days", "credits", "plans", "features"}
    if unknown:
        p.fail(sorted(unknown)[0], "unknown top-level key (expected grace_period_days, credits, features, plans)")
    grace = p.days(raw.get("grace_period_days", DEFAULT_GRACE_PERIOD_DAYS), "grace_period_days")

    credits: dict[str, CreditDef] = {}
    deny_on_outage: set[str] = set()
    for key, body in p.table(raw.get("credits", {}), "credits").items():
        where = f"credits.{key}"
        body = p.table(body, where)
        p.only(
            body,
            where,
            {
                "dodo_credit_entitlement_id",
                "overage_limit",
                "rollover",
                "on_outage",
                "dodo_meter_event",
                "low_balance_threshold",
            },
        )
        meter = body.get("dodo_meter_event")
        if meter is not None and (not isinstance(meter, str) or not meter.strip() or len(meter) > 255):
            p.fail(f"{where}.dodo_meter_event", "must be a non-empty event name of at most 255 characters")
        if p.on_outage(body.get("on_outage", "serve_stale"), f"{where}.on_outage"):
            deny_on_outage.add(key)
        linked = body.get("dodo_credit_entitlement_id")
        if linked is not None and (not isinstance(linked, str) or not linked):
            p.fail(f"{where}.dodo_credit_entitlement_id", "must be a non-empty string")
        overage = p.decimal(body.get("overage_limit", "0"), f"{where}.overage_limit", allow_zero=True)
        rollover = body.get("rollover", False)
        if not isinstance(rollover, bool):
            p.fail(f"{where}.rollover", "must be true or false")
        low = body.get("low_balance_threshold")
        credits[key] = CreditDef(
            key,
            linked,
            overage,
            rollover,
            meter,
            None if low is None else p.threshold(low, f"{where}.low_balance_threshold"),
        )
    mirrored_by: dict[str, str] = {}
    for key, credit in credits.items():
        entitlement = credit.dodo_credit_entitlement_id
        if entitlement is None:
            continue
        if entitlement in mirrored_by:
            p.fail(
                f"credits.{key}.dodo_credit_entitlement_id",
                f"{entitlement!r} is already mirrored by credits.{mirrored_by[entitlement]}",
            )
        mirrored_by[entitlement] = key

    kinds: dict[str, FeatureKind] = dict.fromkeys(credits, FeatureKind.CREDIT)
    kind_origin: dict[str, str] = {key: f"credits.{key}" for key in credits}

    def claim(key: str, kind: FeatureKind, where: str) -> None:
        seen = kinds.get(key)
        if seen is not None and seen is not kind:
            p.fail(where, f"{key!r} is used as a {kind.value} here but as a {seen.value} at {kind_origin[key]}")
        kinds.setdefault(key, kind)
        kind_origin.setdefault(key, where)

    plans: dict[str, Plan] = {}
    for product_id, body in p.table(raw.get("plans", {}), "plans").items():
        where = f"plans.{product_id}"
        body = p.table(body, where)
        p.only(body, where, {"name", "features", "limits", "credits", "trial_credits", "grace_period_days"})
        name = body.get("name", product_id)
        if not isinstance(name, str):
            p.fail(f"{where}.name", "must be a string")
        features = body.get("features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features):
            p.fail(f"{where}.features", "must be a list of non-empty strings")
        for feature in features:
            claim(feature, FeatureKind.BOOLEAN, f"{where}.features")
        limits: dict[str, int] = {}
        for key, value in p.table(body.get("limits", {}), f"{where}.limits").items():
            if isinstance(value, bool) or not isinstance(value, int):
                p.fail(f"{where}.limits.{key}", "must be an integer")
            claim(key, FeatureKind.LIMIT, f"{where}.limits.{key}")
            limits[key] = value
        grants: dict[str, dict[str, Decimal]] = {}
        for section in ("credits", "trial_credits"):
            grants[section] = {}
            for key, value in p.table(body.get(section, {}), f"{where}.{section}").items():
                if key not in credits:
                    p.fail(
                        f"{where}.{section}.{key}",
                        f"unknown credit {key!r}: declare it under [credits.{key}]",
                    )
                claim(key, FeatureKind.CREDIT, f"{where}.{section}.{key}")
                grants[section][key] = p.decimal(value, f"{where}.{section}.{key}", allow_zero=True)
        plan_grace = body.get("grace_period_days")
        plans[product_id] = Plan(
            product_id=product_id,
            name=name,
            features=frozenset(features),
            limits=limits,
            credits=grants["credits"],
            trial_credits=grants["trial_credits"],
            grace_period_days=None if plan_grace is None else p.days(plan_grace, f"{where}.grace_period_days"),
        )
    for key, body in p.table(raw.get("features", {}), "features").items():
        where = f"features.{key}"
        body = p.table(body, where)
        p.only(body, where, {"on_outage"})
        if kinds.get(key) not in (FeatureKind.BOOLEAN, FeatureKind.LIMIT):
            p.fail(where, f"{key!r} is not a feature or limit of any plan (credits say on_outage in [credits.{key}])")
        if p.on_outage(body.get("on_outage", "serve_stale"), f"{where}.on_outage"):
            deny_on_outage.add(key)
    return Catalog(
        plans=plans,
        credits=credits,
        grace_period_days=grace,
        feature_kinds=kinds,
        deny_on_outage=frozenset(deny_on_outage),
        source=source,
    )


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> Any:
        raise CatalogError(f"{self.source}: {key}: {message}")

    def table(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(where, "must be a table")
        return cast(dict[str, Any], value)

    def only(self, body: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        extra = sorted(set(body) - allowed)
        if extra:
            self.fail(f"{where}.{extra[0]}", f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def on_outage(self, value: Any, where: str) -> bool:
        """True for "deny", False for "serve_stale"."""
        if value not in ("deny", "serve_stale"):
            self.fail(where, 'must be "deny" or "serve_stale"')
        return bool(value == "deny")

    def days(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(where, "must be a whole number of days, 0 or more")
        return int(value)

    def threshold(self, value: Any, where: str) -> LowBalanceThreshold:
        """A decimal string ("500") or a percentage of the last grant ("10%", more than 0, at most 100)."""
        if isinstance(value, str) and value.endswith("%"):
            share = self.decimal(value[:-1], where, allow_zero=False)
            if share > 100:
                self.fail(where, f"a percentage must be at most 100%, got {value!r}")
            return LowBalanceThreshold(share, percent_of_last_grant=True)
        return LowBalanceThreshold(self.decimal(value, where, allow_zero=True))

    def decimal(self, value: Any, where: str, *, allow_zero: bool) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.fail(where, 'must be a decimal string such as "1500" or "0.25"')
        try:
            amount = Decimal(str(value))
        except InvalidOperation:
            amount = Decimal("NaN")
        if not amount.is_finite() or amount < 0 or (amount == 0 and not allow_zero):
            self.fail(where, f"must be a non-negative decimal, got {value!r}")
        return amount

"""One object owns the pluggy manager and exposes each hook as a typed method.

Core code never touches ``pm.hook`` directly: pluggy stops at the first
exception, and each of our hooks needs its own failure policy (eligibility
fails closed, notifications fail open), so implementations are called one by
one here, timed, and their errors logged and counted with the plugin's name.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import pluggy

from engine import hookspecs
from engine.hookspecs import PROJECT
from engine.metrics import Metrics
from engine.plugin import ENTRY_POINT_GROUP

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from engine.models import Appointment, Patient
    from engine.requests import Candidate, Change, SlotQuery

log = logging.getLogger("slotengine.plugins")

#: Built-in behaviours, registered exactly like a vendor's entry point.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("eligibility", "plugins.eligibility"),
    ("referrals", "plugins.referrals"),
    ("reminders", "plugins.reminders"),
    ("waitlist_fill", "plugins.waitlist_fill"),
    ("instructions", "plugins.instructions"),
    ("notices", "plugins.notices"),
)


class PluginError(Exception):
    """A plugin could not be loaded or configured; names the plugin."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    origin: str  # "builtin", or "entry point <dist> <version>"
    module: str
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    decision: str  # allow | review | veto
    reason: str = ""
    plugin: str = ""


_STRENGTH = {"allow": 0, "review": 1, "veto": 2}


class PluginHost:
    def __init__(
        self,
        *,
        builtins: Iterable[tuple[str, str]] = BUILTIN_PLUGINS,
        disabled: Iterable[str] = (),
        discover: bool = True,
        extra: Iterable[tuple[str, object]] = (),
        metrics: Optional[Metrics] = None,
    ):
        self.metrics = metrics or Metrics()
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[str, str] = {}
        self.disabled = frozenset(disabled)
        for name in self.disabled:
            self.pm.set_blocked(name)
        if discover:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in self.disabled:
                    continue
                try:
                    module = ep.load()
                except Exception as exc:  # noqa: BLE001 - name the plugin, then stop
                    raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
                dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
                self._register(ep.name, module, f"entry point ({dist})")
        for name, module_name in builtins:
            if name in self.disabled or self.pm.has_plugin(name):
                continue
            self._register(name, importlib.import_module(module_name), "builtin")
        for name, plugin in extra:
            if name not in self.disabled:
                self._register(name, plugin, "given")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin_name!r}: {exc}") from exc

    def _register(self, name: str, plugin: object, origin: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} registered twice: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        self._origins[name] = origin

    # --- introspection -------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            infos.append(PluginInfo(name, self._origins.get(name, "?"), module, hooks))
        return sorted(infos, key=lambda info: info.name)

    def get(self, name: str) -> object | None:
        return self.pm.get_plugin(name)

    # --- calling -------------------------------------------------------------

    def _each(self, hook_name: str, kwargs: dict[str, Any]):
        """Yield (plugin name, result or exception) for each implementation."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            args = [kwargs[name] for name in impl.argnames]
            started = time.perf_counter()
            try:
                result = impl.function(*args)
            except Exception as exc:  # noqa: BLE001 - policy applied by the caller
                self.metrics.plugin_errors.labels(impl.plugin_name, hook_name).inc()
                log.error(
                    "plugin hook raised",
                    exc_info=True,
                    extra={"plugin": impl.plugin_name, "hook": hook_name, "error": type(exc).__name__},
                )
                yield impl.plugin_name, exc
            else:
                yield impl.plugin_name, result
            finally:
                self.metrics.plugin_seconds.labels(impl.plugin_name, hook_name).observe(
                    time.perf_counter() - started
                )

    def configure(self, settings_by_plugin: dict[str, dict[str, Any]], context: Any) -> None:
        """Give each plugin its own settings section; a plugin that refuses them stops start-up."""
        hook = self.pm.hook.slotengine_configure
        for impl in reversed(hook.get_hookimpls()):
            kwargs = {"settings": dict(settings_by_plugin.get(impl.plugin_name, {})), "context": context}
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - name the plugin, then stop
                raise PluginError(f"plugin {impl.plugin_name!r} could not be configured: {exc}") from exc

    def register_jobs(self, register: Callable[..., None]) -> None:
        for plugin, outcome in self._each("slotengine_register_jobs", {"register": register}):
            if isinstance(outcome, Exception):
                raise PluginError(f"plugin {plugin!r} failed to register its jobs: {outcome}") from outcome

    def register_channels(self, register: Callable[[str, Any], None]) -> None:
        for plugin, outcome in self._each("slotengine_register_channels", {"register": register}):
            if isinstance(outcome, Exception):
                raise PluginError(f"plugin {plugin!r} failed to register channels: {outcome}") from outcome

    def check_booking(
        self, session: "Session", appointment: "Appointment", patient: Optional["Patient"], action: str
    ) -> Decision:
        strongest = Decision("allow")
        kwargs = {"session": session, "appointment": appointment, "patient": patient, "action": action}
        for plugin, outcome in self._each("slotengine_check_booking", kwargs):
            if isinstance(outcome, Exception):
                decision = Decision("review", f"{plugin} could not check this booking ({type(outcome).__name__})", plugin)
            elif outcome is None:
                continue
            elif isinstance(outcome, dict) and outcome.get("decision") in ("allow", "review", "veto"):
                decision = Decision(outcome["decision"], str(outcome.get("reason", "")), plugin)
            else:
                log.error("plugin returned an unusable booking decision", extra={"plugin": plugin})
                self.metrics.plugin_errors.labels(plugin, "slotengine_check_booking").inc()
                decision = Decision("review", f"{plugin} returned an unusable answer", plugin)
            if _STRENGTH[decision.decision] > _STRENGTH[strongest.decision]:
                strongest = decision
        return strongest

    def score(self, candidate: "Candidate", query: "SlotQuery") -> float:
        total = 0.0
        for plugin, outcome in self._each("slotengine_score_slot", {"candidate": candidate, "query": query}):
            if isinstance(outcome, (int, float)) and not isinstance(outcome, bool):
                total += float(outcome)
            elif outcome is not None and not isinstance(outcome, Exception):
                log.error("plugin returned a non-numeric slot score", extra={"plugin": plugin})
                self.metrics.plugin_errors.labels(plugin, "slotengine_score_slot").inc()
        return total

    @property
    def has_scorers(self) -> bool:
        return bool(self.pm.hook.slotengine_score_slot.get_hookimpls())

    def schedule_changed(self, session: "Session", change: "Change") -> None:
        hook = self.pm.hook.slotengine_schedule_changed
        for impl in reversed(hook.get_hookimpls()):
            kwargs = {"session": session, "change": change}
            started = time.perf_counter()
            savepoint = session.begin_nested()
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - fail open, keep the change
                savepoint.rollback()
                self.metrics.plugin_errors.labels(impl.plugin_name, hook.name).inc()
                log.error(
                    "plugin hook raised",
                    exc_info=True,
                    extra={"plugin": impl.plugin_name, "hook": hook.name, "error": type(exc).__name__},
                )
            else:
                savepoint.commit()
            finally:
                self.metrics.plugin_seconds.labels(impl.plugin_name, hook.name).observe(
                    time.perf_counter() - started
                )

    def after_change(self, change: "Change") -> None:
        for _plugin, _outcome in self._each("slotengine_after_change", {"change": change}):
            pass  # failures are logged and counted by _each; notifications fail open

    def patient_instructions(self, appointment: "Appointment", location_code: str) -> list[str]:
        lines: list[str] = []
        kwargs = {"appointment": appointment, "location_code": location_code}
        for _plugin, outcome in self._each("slotengine_patient_instructions", kwargs):
            if isinstance(outcome, list):
                lines.extend(str(line) for line in outcome)
        return lines

    def route_referral(self, session: "Session", referral: dict[str, Any]) -> Optional[dict[str, Any]]:
        for _plugin, outcome in self._each("slotengine_route_referral", {"session": session, "referral": referral}):
            if isinstance(outcome, dict):
                return outcome
        return None

"""One object owns the pluggy manager and exposes each hook as a typed method.

Core code never touches ``pm.hook`` directly: pluggy stops at the first
exception, and each of our hooks needs its own failure policy (eligibility
fails closed, notifications fail open), so implementations are called one by
one here, in pluggy's order, timed, and their errors logged and counted with
the plugin's name.  Every call is offered the engine context (``context``,
set by ``configure``), so hook implementations need no module globals.
"""
from __future__ import annotations

import importlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import date
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import pluggy

from engine import hookspecs
from engine.hookspecs import PROJECT
from engine.metrics import Metrics
from engine.plugin import ENTRY_POINT_GROUP

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from engine.models import Appointment, Coverage, Patient, Slot, WaitlistEntry
    from engine.requests import Candidate, Change, SlotQuery

log = logging.getLogger("slotengine.plugins")

#: Built-in behaviours, registered exactly like a vendor's entry point.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("eligibility", "plugins.eligibility"),
    ("referrals", "plugins.referrals"),
    ("reminders", "plugins.reminders"),
    ("waitlist_fill", "plugins.waitlist_fill"),
    ("recall", "plugins.recall"),
    ("flow", "plugins.flow"),
    ("noshow", "plugins.noshow"),
    ("emergency", "plugins.emergency"),
    ("instructions", "plugins.instructions"),
    ("notices", "plugins.notices"),
    ("channels", "plugins.channels"),
)


#: ``session.info`` key: when true, ``slotengine_schedule_changed`` runs without
#: savepoints and a failing implementation raises ``UnguardedHookFailed``.  For a
#: caller that can undo its whole transaction and redo it guarded, as the HL7
#: processor can: savepoints cost two statements for every change.
UNGUARDED_HOOKS = "slotengine.unguarded_hooks"


class UnguardedHookFailed(Exception):
    """A hook implementation raised while running unguarded: nothing of the
    transaction may be kept; the caller rolls it back and redoes it guarded."""

    def __init__(self, plugin: str, hook: str):
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin {plugin!r} raised in {hook} while unguarded")


class PluginError(Exception):
    """A plugin could not be loaded, registered or configured; names the plugin."""

    def __init__(self, message: str, plugin: str = ""):
        self.plugin = plugin
        super().__init__(message)


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``slotengine plugins list``."""

    name: str
    origin: str  # "builtin", "entry point (<dist> <version>)" or "given"
    module: str
    hooks: tuple[str, ...]
    enabled: bool = True

    def as_row(self) -> dict[str, Any]:
        return {"name": self.name, "origin": self.origin, "module": self.module,
                "hooks": list(self.hooks), "enabled": self.enabled}


@dataclass(frozen=True)
class Decision:
    decision: str  # allow | review | veto
    reason: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class JobRegistration:
    """A job as a plugin registered it with ``slotengine_register_jobs``."""

    plugin: str
    job_id: str
    func: Callable[..., Any]
    seconds: Optional[float] = None
    cron: Optional[dict[str, Any]] = None
    at_start: bool = False
    misfire_grace_time: Optional[int] = None


_STRENGTH = {"allow": 0, "review": 1, "veto": 2}


@dataclass(frozen=True, slots=True)
class _Call:
    """A hook implementation as the host calls it: looked up once, not at every call."""

    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    observe: Callable[[float], None]  # its (plugin, hook) child of slotengine_plugin_seconds


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
        self._in_flight: dict[int, tuple[str, str, float]] = {}
        self._prepared: dict[str, tuple[list, list[_Call]]] = {}  # hook -> (pluggy's impls, their calls)
        self._tokens = itertools.count()
        self._notifiers: Optional[dict[str, "_Notifier"]] = None
        self._max_pending = 10_000
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.context: Any = None
        self._origins: dict[str, str] = {}
        self._disabled_known: dict[str, tuple[str, str]] = {}  # name -> (origin, module)
        self._routes: Optional[list[tuple[str, str, Callable, str]]] = None
        self.disabled = frozenset(disabled)
        for name in self.disabled:
            self.pm.set_blocked(name)
        if discover:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
                origin = f"entry point ({dist})"
                if ep.name in self.disabled:
                    self._disabled_known[ep.name] = (origin, ep.value)
                    continue
                try:
                    module = ep.load()
                except Exception as exc:  # noqa: BLE001 - name the plugin, then stop
                    raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}", ep.name) from exc
                self._register(ep.name, module, origin)
        for name, module_name in builtins:
            if name in self.disabled:
                self._disabled_known[name] = ("builtin", module_name)
                continue
            if self.pm.has_plugin(name):
                log.info("a plugin replaces the built-in of the same name", extra={"plugin": name})
                continue
            self._register(name, importlib.import_module(module_name), "builtin")
        for name, plugin in extra:
            if name in self.disabled:
                self._disabled_known[name] = ("given", getattr(plugin, "__name__", type(plugin).__name__))
                continue
            self._register(name, plugin, "given")
        unknown = self.disabled - set(self._disabled_known)
        if unknown:
            log.warning("disabled plugins not found", extra={"plugins": sorted(unknown)})
        self.unknown_disabled = frozenset(unknown)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or "?"
            raise PluginError(f"plugin {name!r}: {exc}", name) from exc

    def _register(self, name: str, plugin: object, origin: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"plugin {name!r} registered twice: {exc}", name) from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r}: {exc}", name) from exc
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    self.pm.unregister(plugin)
                    raise PluginError(
                        f"plugin {name!r}: {caller.name} is a hook wrapper; slotengine calls implementations "
                        "one by one to apply each hook's failure policy, so wrappers are not supported", name)
        self._origins[name] = origin

    # --- introspection -------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        """Every plugin known to this host, enabled or disabled by config, by name:
        the rows of ``slotengine plugins list``."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            infos.append(PluginInfo(name, self._origins.get(name, "?"), module, hooks))
        for name, (origin, module) in self._disabled_known.items():
            infos.append(PluginInfo(name, origin, module, (), enabled=False))
        return sorted(infos, key=lambda info: info.name)

    def plugin_rows(self) -> list[dict[str, Any]]:
        """``plugins()`` as plain dicts (name, origin, module, hooks, enabled)."""
        return [info.as_row() for info in self.plugins()]

    def get(self, name: str) -> object | None:
        return self.pm.get_plugin(name)

    # --- calling -------------------------------------------------------------

    def _impls(self, hook_name: str):
        """Implementations in pluggy's call order: tryfirst, newest first, trylast."""
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def _calls(self, hook_name: str) -> list[_Call]:
        """``_impls``, each with its latency histogram: prepared again only when pluggy's
        list changes (a plugin registered or unregistered through ``pm``)."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        prepared = self._prepared.get(hook_name)
        if prepared is None or prepared[0] != impls:
            calls = [_Call(impl.plugin_name, impl.function, tuple(impl.argnames),
                           self.metrics.plugin_seconds.labels(impl.plugin_name, hook_name).observe)
                     for impl in reversed(impls)]
            prepared = self._prepared[hook_name] = (impls, calls)
        return prepared[1]

    def _failed(self, plugin: str, hook_name: str, exc: BaseException) -> None:
        self.metrics.plugin_errors.labels(plugin, hook_name).inc()
        log.error(
            "plugin hook raised",
            exc_info=exc,
            extra={"plugin": plugin, "hook": hook_name, "error": type(exc).__name__},
        )

    def _each(self, hook_name: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """Yield (plugin name, result or exception) for each implementation."""
        kwargs = {"context": self.context, **kwargs}
        for call in self._calls(hook_name):
            args = [kwargs[name] for name in call.argnames]
            started = time.perf_counter()
            token = self._enter(call, hook_name, started)
            try:
                result = call.function(*args)
            except Exception as exc:  # noqa: BLE001 - policy applied by the caller
                self._failed(call.plugin, hook_name, exc)
                outcome: Any = exc
            else:
                outcome = result
            finally:
                self._done(token, call, started)
            yield call.plugin, outcome

    def _each_in_savepoint(self, session: "Session", hook_name: str, kwargs: dict[str, Any]) -> None:
        """Call every implementation; a failure undoes only its own work.

        One savepoint for all of them (SAVEPOINT and RELEASE cost a statement
        each, for every plugin of every change); only when one fails is that
        work rolled back and every implementation run again, each in a
        savepoint of its own, so the end result is the same."""
        calls = self._calls(hook_name)
        if not calls:
            return
        kwargs = {"context": self.context, "session": session, **kwargs}
        if session.info.get(UNGUARDED_HOOKS):
            failed = self._in_turn(calls, hook_name, kwargs)
            if failed is not None:  # logged and counted when the caller redoes it guarded
                raise UnguardedHookFailed(failed[0].plugin, hook_name) from failed[1]
            return
        savepoint = session.begin_nested()
        if self._in_turn(calls, hook_name, kwargs) is None:
            savepoint.commit()
            return
        savepoint.rollback()  # and redone one by one, where the failure is logged
        self._each_in_own_savepoint(session, calls, hook_name, kwargs)

    def _in_turn(self, calls: list[_Call], hook_name: str, kwargs: dict[str, Any]) -> Optional[tuple[_Call, Exception]]:
        """Call one implementation after another until one raises: that one and its exception,
        or None.  Every change runs this for every plugin, so it is lean: one clock reading
        ends a call's time and starts the next's, and one ``_in_flight`` entry names the call
        running."""
        token, clock = next(self._tokens), time.perf_counter
        started = clock()
        try:
            for call in calls:
                self._in_flight[token] = (call.plugin, hook_name, started)
                try:
                    call.function(*[kwargs[name] for name in call.argnames])
                except Exception as exc:  # noqa: BLE001 - the caller applies the hook's policy
                    return call, exc
                finally:
                    ended = clock()
                    call.observe(ended - started)
                    started = ended
            return None
        finally:
            self._in_flight.pop(token, None)  # None: there was no call

    def _each_in_own_savepoint(self, session: "Session", calls: list[_Call], hook_name: str,
                               kwargs: dict[str, Any]) -> None:
        for call in calls:
            started = time.perf_counter()
            savepoint = session.begin_nested()
            token = self._enter(call, hook_name, started)
            try:
                call.function(*[kwargs[name] for name in call.argnames])
            except Exception as exc:  # noqa: BLE001 - fail open, keep the caller's work
                savepoint.rollback()
                self._failed(call.plugin, hook_name, exc)
            else:
                savepoint.commit()
            finally:
                self._done(token, call, started)

    # --- lifecycle and registration -------------------------------------------

    def configure(self, settings_by_plugin: dict[str, dict[str, Any]], context: Any) -> None:
        """Give each plugin its own settings section; a plugin that refuses them stops start-up.

        ``context`` is then offered to every later hook call."""
        self.context = context
        self._routes = None
        for impl in self._impls("slotengine_configure"):
            kwargs = {"settings": dict(settings_by_plugin.get(impl.plugin_name, {}) or {}), "context": context}
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except Exception as exc:  # noqa: BLE001 - name the plugin, then stop
                self._failed(impl.plugin_name, "slotengine_configure", exc)
                raise PluginError(f"plugin {impl.plugin_name!r} could not be configured: {exc}",
                                  impl.plugin_name) from exc

    def _register_each(self, hook_name: str, what: str, make_register: Callable[[str], Callable]) -> None:
        for impl in self._impls(hook_name):
            kwargs = {"register": make_register(impl.plugin_name), "context": self.context}
            try:
                impl.function(*[kwargs[name] for name in impl.argnames])
            except PluginError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the plugin, then stop
                self._failed(impl.plugin_name, hook_name, exc)
                raise PluginError(f"plugin {impl.plugin_name!r} failed to register {what}: {exc}",
                                  impl.plugin_name) from exc

    def job_registrations(self) -> list[JobRegistration]:
        """Every job the plugins register (``slotengine_register_jobs``); ids must be unique."""
        jobs: dict[str, JobRegistration] = {}

        def make_register(plugin: str):
            def register(job_id: str, func: Callable[..., Any], *, seconds: Optional[float] = None,
                         cron: Optional[dict[str, Any]] = None, at_start: bool = False,
                         misfire_grace_time: Optional[int] = None) -> None:
                if job_id in jobs:
                    raise PluginError(f"plugin {plugin!r} registered job {job_id!r}, already registered by "
                                      f"{jobs[job_id].plugin!r}", plugin)
                if (seconds is None) == (cron is None):
                    raise PluginError(f"plugin {plugin!r}: job {job_id!r} needs seconds= or cron=", plugin)
                jobs[job_id] = JobRegistration(plugin, job_id, func, seconds, cron, at_start, misfire_grace_time)
            return register

        self._register_each("slotengine_register_jobs", "its jobs", make_register)
        return list(jobs.values())

    def register_jobs(self, register: Callable[..., None]) -> None:
        """Pass every plugin's jobs to ``register(job_id, func, **options)``."""
        for job in self.job_registrations():
            register(job.job_id, job.func, seconds=job.seconds, cron=job.cron, at_start=job.at_start,
                     misfire_grace_time=job.misfire_grace_time)

    def channels(self) -> dict[str, Any]:
        """Message channels by name (``slotengine_register_channels``); the first registration wins."""
        channels: dict[str, Any] = {}

        def make_register(plugin: str):
            def register(name: str, channel: Any) -> None:
                if not callable(getattr(channel, "send", None)):
                    raise PluginError(f"plugin {plugin!r}: channel {name!r} has no send(message) method", plugin)
                if name in channels:
                    log.info("channel already registered; ignored", extra={"plugin": plugin, "channel": name})
                    return
                channels[name] = channel
            return register

        self._register_each("slotengine_register_channels", "channels", make_register)
        return channels

    def register_channels(self, register: Callable[[str, Any], None]) -> None:
        for name, channel in self.channels().items():
            register(name, channel)

    def http_routes(self) -> list[tuple[str, str, Callable[[bytes, dict[str, str], dict[str, str]], tuple[int, dict]], str]]:
        """``(method, path, handler, plugin_name)`` for every route the plugins register.

        Computed once per ``configure``; two plugins claiming one method and path
        stop start-up."""
        if self._routes is not None:
            return list(self._routes)
        routes: dict[tuple[str, str], tuple[str, str, Callable, str]] = {}

        def make_register(plugin: str):
            def register(method: str, path: str, handler: Callable) -> None:
                key = (method.upper(), path)
                if not path.startswith("/"):
                    raise PluginError(f"plugin {plugin!r}: route path {path!r} must start with /", plugin)
                if not callable(handler):
                    raise PluginError(f"plugin {plugin!r}: handler for {method} {path} is not callable", plugin)
                if key in routes:
                    raise PluginError(f"plugin {plugin!r}: {method.upper()} {path} is already served by "
                                      f"{routes[key][3]!r}", plugin)
                routes[key] = (method.upper(), path, handler, plugin)
            return register

        self._register_each("slotengine_register_http_routes", "HTTP routes", make_register)
        self._routes = sorted(routes.values(), key=lambda r: (r[1], r[0]))
        return list(self._routes)

    # --- booking ----------------------------------------------------------------

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

    def verify_coverage(self, session: "Session", appointment: "Appointment", patient: "Patient",
                        coverages: "list[Coverage]", service_date: date) -> dict[str, Any]:
        """The first plugin's verdict; fails closed (``outcome: error``) when one raises or none answers."""
        kwargs = {"session": session, "appointment": appointment, "patient": patient,
                  "coverages": coverages, "service_date": service_date}
        for plugin, outcome in self._each("slotengine_verify_coverage", kwargs):
            if isinstance(outcome, Exception):
                return {"outcome": "error", "findings": [f"{plugin} could not verify coverage ({type(outcome).__name__})"],
                        "copay": None, "coverage_id": None, "source": plugin}
            if isinstance(outcome, dict):
                result = {"findings": [], "copay": None, "coverage_id": None, **outcome}
                result.setdefault("source", plugin)
                if result.get("outcome") not in ("eligible", "ineligible", "unknown"):
                    self.metrics.plugin_errors.labels(plugin, "slotengine_verify_coverage").inc()
                    return {**result, "outcome": "error",
                            "findings": [f"{plugin} returned an unusable outcome {result.get('outcome')!r}"]}
                return result
            if outcome is not None:
                self.metrics.plugin_errors.labels(plugin, "slotengine_verify_coverage").inc()
                return {"outcome": "error", "findings": [f"{plugin} returned an unusable answer"],
                        "copay": None, "coverage_id": None, "source": plugin}
        return {"outcome": "unknown", "findings": ["no plugin verifies coverage"], "copay": None,
                "coverage_id": None, "source": ""}

    def score(self, candidate: "Candidate", query: "SlotQuery", session: Optional["Session"] = None) -> float:
        return sum(self.slot_scores(candidate, query, session).values())

    def slot_scores(self, candidate: "Candidate", query: "SlotQuery",
                    session: Optional["Session"] = None) -> dict[str, float]:
        """Each plugin's score for a candidate, by plugin name (plugins answering ``None`` left out)."""
        return self._scores("slotengine_score_slot", {"candidate": candidate, "query": query, "session": session})

    def _sum(self, hook_name: str, kwargs: dict[str, Any]) -> float:
        return sum(self._scores(hook_name, kwargs).values())

    def _scores(self, hook_name: str, kwargs: dict[str, Any]) -> dict[str, float]:
        scores: dict[str, float] = {}
        for plugin, outcome in self._each(hook_name, kwargs):
            if isinstance(outcome, (int, float)) and not isinstance(outcome, bool):
                scores[plugin] = scores.get(plugin, 0.0) + float(outcome)
            elif outcome is not None and not isinstance(outcome, Exception):
                log.error("plugin returned a non-numeric score", extra={"plugin": plugin, "hook": hook_name})
                self.metrics.plugin_errors.labels(plugin, hook_name).inc()
        return scores

    def slot_exclusion(self, candidate: "Candidate", query: "SlotQuery",
                       session: Optional["Session"] = None) -> Optional[str]:
        """``"<plugin>: <reason>"`` from the first plugin that leaves the candidate out, else None.
        Fails open: a raising plugin, or one answering with something other than a string, keeps it."""
        hook_name = "slotengine_exclude_slot"
        for plugin, outcome in self._each(hook_name, {"candidate": candidate, "query": query, "session": session}):
            if isinstance(outcome, str) and outcome:
                return f"{plugin}: {outcome}"
            if outcome is not None and not isinstance(outcome, Exception):
                log.error("plugin returned an unusable slot exclusion", extra={"plugin": plugin, "hook": hook_name})
                self.metrics.plugin_errors.labels(plugin, hook_name).inc()
        return None

    @property
    def has_scorers(self) -> bool:
        return bool(self.pm.hook.slotengine_score_slot.get_hookimpls())

    @property
    def has_slot_filters(self) -> bool:
        return bool(self.pm.hook.slotengine_exclude_slot.get_hookimpls())

    @property
    def has_booking_checks(self) -> bool:
        """Whether any plugin judges bookings (the engine then loads the patient for it)."""
        return bool(self.pm.hook.slotengine_check_booking.get_hookimpls())

    @property
    def has_overbook_judges(self) -> bool:
        return bool(self.pm.hook.slotengine_allow_overbook.get_hookimpls())

    def allow_overbook(self, session: "Session", candidate: "Candidate", patient_id: Optional[int],
                       appointment_type: str, action: str) -> dict[str, Any]:
        """The plugins' verdict on a seat above a full slot's capacity: the allowing
        plugin's dict, or the first refusal's, with ``plugin`` added.  Fails closed:
        a raising plugin, an unusable answer, or no plugin allowing, refuses."""
        hook_name = "slotengine_allow_overbook"
        kwargs = {"session": session, "candidate": candidate, "patient_id": patient_id,
                  "appointment_type": appointment_type, "action": action}
        allowed: Optional[dict[str, Any]] = None
        for plugin, outcome in self._each(hook_name, kwargs):
            if isinstance(outcome, Exception):
                return {"allow": False, "plugin": plugin,
                        "reason": f"{plugin} could not judge the overbooking ({type(outcome).__name__})"}
            if outcome is None:
                continue
            if not isinstance(outcome, dict) or not isinstance(outcome.get("allow"), bool):
                log.error("plugin returned an unusable overbooking verdict", extra={"plugin": plugin})
                self.metrics.plugin_errors.labels(plugin, hook_name).inc()
                return {"allow": False, "plugin": plugin, "reason": f"{plugin} returned an unusable answer"}
            if not outcome["allow"]:
                return {**outcome, "plugin": plugin}
            allowed = allowed or {**outcome, "plugin": plugin}
        return allowed or {"allow": False, "plugin": "", "reason": "no plugin allows overbooking"}

    # --- after a change -----------------------------------------------------------

    def schedule_changed(self, session: "Session", change: "Change") -> None:
        self._each_in_savepoint(session, "slotengine_schedule_changed", {"change": change})

    def after_change(self, change: "Change") -> None:
        """Tell every plugin about a committed change: inline, or — once the
        daemon has called ``notify_in_background`` — each plugin in its own
        worker thread, so a slow or hung plugin delays only its own notices."""
        hook_name = "slotengine_after_change"
        if self._notifiers is None:
            calls, kwargs = self._calls(hook_name), {"context": self.context, "change": change}
            while (failed := self._in_turn(calls, hook_name, kwargs)) is not None:
                self._failed(failed[0].plugin, hook_name, failed[1])  # notifications fail open: the rest still run
                calls = calls[calls.index(failed[0]) + 1:]
            return
        for call in self._calls(hook_name):
            worker = self._notifiers.get(call.plugin)
            if worker is None:
                worker = self._notifiers[call.plugin] = _Notifier(self, call.plugin)
            worker.submit(change)

    def notify_in_background(self, max_pending: int = 10_000) -> None:
        self._notifiers = {}
        self._max_pending = max_pending

    def stop_notifications(self, timeout: float) -> None:
        notifiers, self._notifiers = self._notifiers or {}, None
        for worker in notifiers.values():
            worker.stop(timeout)

    def _notify_one(self, plugin_name: str, change: "Change") -> None:
        for call in self._calls("slotengine_after_change"):
            if call.plugin != plugin_name:
                continue
            kwargs = {"context": self.context, "change": change}
            started = time.perf_counter()
            token = self._enter(call, "slotengine_after_change", started)
            try:
                call.function(*[kwargs[name] for name in call.argnames])
            except Exception as exc:  # noqa: BLE001 - notifications fail open
                self._failed(plugin_name, "slotengine_after_change", exc)
            finally:
                self._done(token, call, started)

    # --- watchdog ---------------------------------------------------------------

    def _enter(self, call: _Call, hook: str, started: float) -> int:
        """Note a call begun at ``started`` (``time.perf_counter()``) for ``stuck_calls``."""
        token = next(self._tokens)
        self._in_flight[token] = (call.plugin, hook, started)
        return token

    def _done(self, token: int, call: _Call, started: float) -> None:
        """The call ``_enter`` noted has returned: its time observed."""
        del self._in_flight[token]
        call.observe(time.perf_counter() - started)

    def stuck_calls(self, longer_than: float = 10.0) -> list[dict[str, Any]]:
        """Plugin calls running longer than ``longer_than`` seconds, for health and logs.

        Python cannot stop a thread, so a plugin that blocks inside a booking
        transaction holds that transaction until it returns; this names it."""
        now = time.perf_counter()
        return [{"plugin": plugin, "hook": hook, "seconds": round(now - started, 1)}
                for plugin, hook, started in list(self._in_flight.values()) if now - started > longer_than]

    def staff_notice(self, session: "Session", notice: dict[str, Any]) -> None:
        """Tell staff (``team``, ``subject``, ``text``…) inside the caller's transaction."""
        if not self.pm.hook.slotengine_staff_notice.get_hookimpls():
            log.warning("staff notice with no plugin to deliver it",
                        extra={"team": notice.get("team"), "subject": notice.get("subject")})
            return
        self._each_in_savepoint(session, "slotengine_staff_notice", {"notice": notice})

    # --- patients -------------------------------------------------------------------

    def patient_instructions(self, appointment: "Appointment", location_code: str, language: str = "en",
                             session: Optional["Session"] = None) -> list[str]:
        """Every plugin's lines, concatenated; ``session`` defaults to the appointment's own."""
        lines: list[str] = []
        if session is None:
            from sqlalchemy.orm import object_session  # noqa: PLC0415 - only needed here
            from sqlalchemy.orm.exc import UnmappedInstanceError  # noqa: PLC0415

            try:
                session = object_session(appointment)
            except UnmappedInstanceError:
                session = None
        kwargs = {"session": session, "appointment": appointment, "location_code": location_code,
                  "language": language}
        for _plugin, outcome in self._each("slotengine_patient_instructions", kwargs):
            if isinstance(outcome, list):
                lines.extend(str(line) for line in outcome)
        return lines

    def route_referral(self, session: "Session", referral: dict[str, Any]) -> Optional[dict[str, Any]]:
        for plugin, outcome in self._each("slotengine_route_referral", {"session": session, "referral": referral}):
            if isinstance(outcome, dict):
                return {**outcome, "plugin": plugin}
        return None

    def referral_received(self, session: "Session", referral: dict[str, Any]) -> Optional[int]:
        """Record a referral inside the caller's transaction: the id the first
        plugin answers with, or ``None`` when no plugin records referrals.

        Each implementation runs in its own savepoint.  One that raises is
        rolled back, logged and counted, and its exception is raised again:
        the caller's unit of work must fail (an HL7 message is parked) rather
        than lose the referral.  An answer that is not an int raises
        ``PluginError`` naming the plugin."""
        hook_name = "slotengine_referral_received"
        kwargs = {"context": self.context, "session": session, "referral": referral}
        for call in self._calls(hook_name):
            started = time.perf_counter()
            savepoint = session.begin_nested()
            token = self._enter(call, hook_name, started)
            try:
                result = call.function(*[kwargs[name] for name in call.argnames])
            except Exception as exc:
                if savepoint.is_active:
                    savepoint.rollback()
                self._failed(call.plugin, hook_name, exc)
                raise
            else:
                if result is None or (isinstance(result, int) and not isinstance(result, bool)):
                    savepoint.commit()
                else:
                    savepoint.rollback()
                    error = PluginError(f"plugin {call.plugin!r} answered {hook_name} with a "
                                        f"{type(result).__name__}, not a referral id", call.plugin)
                    self._failed(call.plugin, hook_name, error)
                    raise error
            finally:
                self._done(token, call, started)
            if result is not None:
                return result
        return None

    def schedule_owner(self, session: "Session", provider_id: Optional[int], location_id: Optional[int]) -> Optional[str]:
        kwargs = {"session": session, "provider_id": provider_id, "location_id": location_id}
        for plugin, outcome in self._each("slotengine_schedule_owner", kwargs):
            if isinstance(outcome, BaseException):
                raise PluginError(f"plugin {plugin!r} failed to say who owns the calendar: "
                                  f"{type(outcome).__name__}: {outcome}", plugin)
            if outcome is not None:
                return str(outcome)
        return None

    def score_waitlist_entry(self, entry: "WaitlistEntry", slot: "Slot") -> float:
        return self._sum("slotengine_score_waitlist_entry", {"entry": entry, "slot": slot})

    def urgent_request(self, session: "Session", request: Any, actor: Any, scheduler: Any) -> Optional[dict[str, Any]]:
        """The first plugin's answer to an urgent request (``slotengine_urgent_request``),
        or ``None`` when none handles them.  One that raises is logged and
        counted, and the error raised to the caller: the request must not vanish."""
        hook_name = "slotengine_urgent_request"
        kwargs = {"session": session, "request": request, "actor": actor, "scheduler": scheduler}
        for plugin, outcome in self._each(hook_name, kwargs):
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is not None:
                if not isinstance(outcome, dict) or "outcome" not in outcome:
                    error = PluginError(f"plugin {plugin!r} answered {hook_name} with an unusable "
                                        f"{type(outcome).__name__}", plugin)
                    self._failed(plugin, hook_name, error)
                    raise error
                return {**outcome, "plugin": plugin}
        return None


class _Notifier:
    """One plugin's after-change notifications, delivered in order by one thread.

    The queue is bounded: a plugin that stops consuming loses notices (logged
    and counted) instead of growing the daemon's memory without limit."""

    def __init__(self, host: PluginHost, plugin_name: str):
        self.host, self.plugin_name = host, plugin_name
        self.queue: "queue.Queue[Optional[Change]]" = queue.Queue(maxsize=host._max_pending)
        self.thread = threading.Thread(target=self._run, name=f"notify-{plugin_name}", daemon=True)
        self.thread.start()

    def submit(self, change: "Change") -> None:
        try:
            self.queue.put_nowait(change)
        except queue.Full:
            self.host.metrics.plugin_errors.labels(self.plugin_name, "slotengine_after_change").inc()
            log.error("plugin is not keeping up with notifications; notice dropped",
                      extra={"plugin": self.plugin_name, "change": change.kind})

    def _run(self) -> None:
        while (change := self.queue.get()) is not None:
            self.host._notify_one(self.plugin_name, change)

    def stop(self, timeout: float) -> None:
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

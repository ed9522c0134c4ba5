"""The operator's view: a token-protected web dashboard and Prometheus /metrics, served by
the bot process itself on one port. See docs/DASHBOARD.md."""
from bots.dashboard.auth import DashboardError
from bots.dashboard.server import DashboardHandle, check_dashboard, start_dashboard, stop

__all__ = ["DashboardError", "DashboardHandle", "check_dashboard", "start_dashboard", "stop"]

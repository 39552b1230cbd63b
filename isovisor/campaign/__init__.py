"""Fault-injection campaigns: plans, schedules, runs and reports (docs/campaigns.md)."""

"""Benchmarks: slotfill vs the engine alone, an in-process feeder and Celery."""

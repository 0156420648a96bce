"""Internals of dsjax: native-module loading, implementation choice, validation, bench harness."""

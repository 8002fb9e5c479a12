//! # architectlm-loadmanager
//!
//! Resource limits, thresholds and circuit breakers for ArchitectLM.

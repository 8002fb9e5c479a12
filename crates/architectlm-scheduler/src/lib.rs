//! # architectlm-scheduler
//!
//! A durable one-shot and cron scheduler for ArchitectLM.

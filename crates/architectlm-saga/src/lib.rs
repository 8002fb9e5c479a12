//! # architectlm-saga
//!
//! A durable saga coordinator for ArchitectLM.

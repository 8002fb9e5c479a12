//! # architectlm-supervisor
//!
//! Health checks, recovery and OTP-style worker supervision for ArchitectLM.

//! The quickstart: a small order system.
fn main() {}

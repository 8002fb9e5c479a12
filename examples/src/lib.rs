//! Examples of ArchitectLM; see the `[[example]]` targets.

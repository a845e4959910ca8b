//! The score functions live in the shared bundle crate, where the trainer's adaptive attack
//! uses the same definitions; re-exported here for the detector's readers.

pub use csg_bundle::score::*;

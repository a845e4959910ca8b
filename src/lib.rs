//! csgd library.
pub mod detect;

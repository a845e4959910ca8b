//! `csgd`: the adversarial-input detection daemon.

use anyhow::{Result, bail};

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("serve") => bail!("csgd serve: not yet implemented (see issue 4)"),
        _ => bail!("usage: csgd serve"),
    }
}

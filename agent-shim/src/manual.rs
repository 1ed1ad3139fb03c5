// SPDX-License-Identifier: Apache-2.0
//! `agent-shim(1)`, a page per subcommand, and completions for bash, zsh
//! and fish, generated from the clap definitions (`agent-shim
//! generate-docs DIR`; keyward-broker does the same for its own).

use std::io;
use std::path::{Path, PathBuf};

/// Write the pages into `out/man/man1/` and the completions into
/// `out/completions/{bash,zsh,fish}/`. Returns the files written.
pub fn write_docs(cmd: clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    let man_dir = out.join("man").join("man1");
    std::fs::create_dir_all(&man_dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, &man_dir, &mut written)?;
    let name = cmd.get_name().to_owned();
    for (shell, dir, file) in [
        (clap_complete::Shell::Bash, "bash", name.clone()),
        (clap_complete::Shell::Zsh, "zsh", format!("_{name}")),
        (clap_complete::Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
        let path = dir.join(file);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    Ok(written)
}

fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section("1")
        .manual("keyward")
        .source(format!("keyward {}", env!("CARGO_PKG_VERSION")));
    written.push(page.generate_to(dir)?);
    Ok(())
}

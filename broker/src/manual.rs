// SPDX-License-Identifier: Apache-2.0
//! Man pages and shell completions, generated rather than written: the
//! command pages (`keyward-broker(8)` and one per subcommand) from the clap
//! definitions, `broker.toml(5)` from [`crate::config_doc`], completions
//! for bash, zsh and fish from clap again. `keyward-broker generate-docs
//! DIR` writes them (see the README's install lines).

use std::io;
use std::path::{Path, PathBuf};

use roff::{bold, italic, roman, Roff};

use crate::config_doc::{DESCRIPTION, FILES, SECTIONS};

/// Write the man pages of `cmd` (section `section`) and of each of its
/// visible subcommands into `out/man/man<section>/`, and its completions
/// into `out/completions/{bash,zsh,fish}/`. Returns the files written.
pub fn write_command_docs(
    cmd: clap::Command,
    section: &str,
    out: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man_dir = out.join("man").join(format!("man{section}"));
    std::fs::create_dir_all(&man_dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_pages(&cmd, section, &man_dir, &mut written)?;
    written.extend(write_completions(cmd, out)?);
    Ok(written)
}

fn write_pages(
    cmd: &clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, section, dir, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("keyward")
        .source(format!("keyward {}", env!("CARGO_PKG_VERSION")));
    written.push(page.generate_to(dir)?);
    Ok(())
}

/// Completions for bash, zsh and fish, named as each shell looks them up.
pub fn write_completions(mut cmd: clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    let name = cmd.get_name().to_owned();
    let mut written = Vec::new();
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
        std::fs::write(&path, buf)?;
        written.push(path);
    }
    Ok(written)
}

/// `broker.toml(5)`, from the key documentation beside the parser.
pub fn config_page() -> String {
    let mut page = Roff::new();
    page.control(
        "TH",
        [
            "BROKER.TOML",
            "5",
            "",
            &format!("keyward {}", env!("CARGO_PKG_VERSION")),
            "keyward",
        ],
    );
    page.control("SH", ["NAME"]);
    page.text([roman(
        "broker.toml - configuration of the keyward credential broker",
    )]);
    page.control("SH", ["SYNOPSIS"]);
    page.text([bold("/etc/keyward/broker.toml")]);
    page.control("SH", ["DESCRIPTION"]);
    page.text([roman(DESCRIPTION)]);
    for section in SECTIONS {
        page.control("SH", [section.header]);
        page.text([roman(section.doc)]);
        for key in section.keys {
            page.control("TP", []);
            let mut head = vec![bold(key.name), roman(" ("), italic(key.ty)];
            if let Some(default) = key.default {
                head.push(roman(format!(", default {default}")));
            }
            head.push(roman(")"));
            page.text(head);
            page.text([roman(key.doc)]);
        }
    }
    page.control("SH", ["FILES"]);
    for (path, what) in FILES {
        page.control("TP", []);
        page.text([bold(*path)]);
        page.text([roman(*what)]);
    }
    page.control("SH", ["SEE ALSO"]);
    page.text([roman(
        "keyward-broker(8), keyward-broker-check(8), agent-shim(1), systemd.exec(5)",
    )]);
    page.render()
}

/// Write `broker.toml(5)` into `out/man/man5/`.
pub fn write_config_page(out: &Path) -> io::Result<PathBuf> {
    let dir = out.join("man").join("man5");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("broker.toml.5");
    std::fs::write(&path, config_page())?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_config_page_names_every_key() {
        let page = config_page();
        assert!(page.contains("\n.TH BROKER.TOML 5 "), "{page}");
        for section in SECTIONS {
            for key in section.keys {
                let name = key.name.replace('_', "\\_").replace('-', "\\-");
                assert!(
                    page.contains(&format!("\\fB{}", key.name)) || page.contains(&name),
                    "{} missing from broker.toml(5)",
                    key.name
                );
            }
        }
    }
}

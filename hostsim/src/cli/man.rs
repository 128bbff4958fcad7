//! `vmctl man`: the manual page, generated from the clap definitions.

use super::Cli;

/// The manual page: vmctl's own sections, then one per command (`vmctl backup`, `vmctl
/// checkpoint create`, ...) with its synopsis, description and options.
pub(crate) fn man_page(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command()
        .name("vmctl")
        .bin_name("vmctl")
        .about("consistent backups and checkpoints of running QEMU VMs, driven through the guest agent");
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    commands(&cmd, "vmctl", &mut page)?;
    man.render_extra_section(&mut page)?;
    man.render_version_section(&mut page)?;
    // Each piece clap_mangen renders starts with the same preamble: once is enough.
    let page = String::from_utf8_lossy(&page);
    let mut seen = std::collections::HashSet::new();
    for line in page.lines() {
        if (line.starts_with(".ie ") || line.starts_with(".el ")) && !seen.insert(line) {
            continue;
        }
        let line = if line == ".SH EXTRA" { ".SH EXAMPLES" } else { line };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// One section per visible command, depth first; its own sections become subsections, and the
/// options every command shares are left to vmctl's OPTIONS.
fn commands(cmd: &clap::Command, path: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("{path} {}", sub.get_name());
        let sub = sub.clone().bin_name(&name).mut_args(|a| {
            let shared = a.is_global_set() || matches!(a.get_id().as_str(), "help" | "version");
            if shared {
                a.hide(true)
            } else {
                a
            }
        });
        let man = clap_mangen::Man::new(sub.clone());
        let mut text = Vec::new();
        man.render_synopsis_section(&mut text)?;
        man.render_description_section(&mut text)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(&mut text)?;
        }
        let text = String::from_utf8_lossy(&text).replace(".SH ", ".SS ");
        writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
        out.write_all(text.as_bytes())?;
        commands(&sub, &name, out)?;
    }
    Ok(())
}

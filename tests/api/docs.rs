//! The README's settings table and `--help` come from two places; this keeps
//! them saying the same thing: every variable a command reads is in the
//! table, every variable in the table is read by a command, and a default
//! given by both is the same.

use std::collections::BTreeMap;

use channel_assignment::config::Cli;
use clap::CommandFactory as _;

/// `VARIABLE` → its default as clap has it (`None` when it has none), over
/// every command.
fn settings_of_the_binary() -> BTreeMap<String, Option<String>> {
    let cli = Cli::command();
    let mut settings = BTreeMap::new();
    let commands = std::iter::once(&cli).chain(cli.get_subcommands());
    for command in commands {
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let default = arg
                .get_default_values()
                .first()
                .map(|value| value.to_string_lossy().into_owned());
            let env = env.to_string_lossy().into_owned();
            if let Some(other) = settings.insert(env.clone(), default.clone()) {
                assert_eq!(
                    other, default,
                    "{env} has different defaults in different commands"
                );
            }
        }
    }
    settings
}

/// `VARIABLE` → the default column of the README's settings table (`None`
/// for "—"); a row naming two variables gives both.
fn settings_of_the_readme() -> BTreeMap<String, Option<String>> {
    let readme = include_str!("../../README.md");
    let table = readme
        .split("| variable (flag) | default | meaning |")
        .nth(1)
        .expect("the README has the settings table");
    let mut settings = BTreeMap::new();
    for row in table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
    {
        let cells: Vec<&str> = row.split(" | ").collect();
        let default = cells.get(1).map(|cell| cell.trim());
        let default = match default {
            Some(cell) if cell.starts_with('—') => None,
            Some(cell) => Some(cell.trim_matches('`').to_owned()),
            None => None,
        };
        // Variables are the backquoted upper-case words before the flags.
        let names = cells[0].trim_start_matches("| ");
        let names = names.split(" (").next().unwrap_or(names);
        for name in names.split(", ") {
            settings.insert(name.trim_matches('`').to_owned(), default.clone());
        }
    }
    settings
}

#[test]
fn the_readme_settings_table_and_help_name_the_same_settings_and_defaults() {
    let binary = settings_of_the_binary();
    let readme = settings_of_the_readme();
    let undocumented: Vec<&String> = binary.keys().filter(|v| !readme.contains_key(*v)).collect();
    assert!(
        undocumented.is_empty(),
        "read by the binary, missing from the README's table: {undocumented:?}"
    );
    let stale: Vec<&String> = readme.keys().filter(|v| !binary.contains_key(*v)).collect();
    assert!(
        stale.is_empty(),
        "in the README's table, read by no command: {stale:?}"
    );
    for (variable, default) in &binary {
        if let Some(default) = default {
            assert_eq!(
                readme[variable].as_deref(),
                Some(default.as_str()),
                "{variable}: --help's default differs from the README's"
            );
        }
    }
}

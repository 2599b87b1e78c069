//! The workspace's layering, as README's "Architecture" table states it, holds: every crate's
//! tessera dependencies are among those its row allows (optional dependencies, which only
//! test features turn on, are not counted), every crate of the workspace has a row, and the
//! protocol crates that the table marks "no tokio" do not depend on tokio.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

struct Row {
    folder: PathBuf,
    allowed: BTreeSet<String>,
    no_tokio: bool,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The rows of the table under `## Architecture`: crate → folder, allowed imports.
fn table() -> BTreeMap<String, Row> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Architecture")
        .nth(1)
        .expect("README has an Architecture section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `tessera")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", crate, folder, holds, may import, ""
        assert!(cells.len() >= 6, "a row of five cells: {line}");
        let name = cells[1].trim_matches('`').to_string();
        let folder = root().join(cells[2].trim_matches('`'));
        let imports = cells[4];
        let allowed = imports
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| w.starts_with("tessera"))
            .map(str::to_string)
            .collect();
        rows.insert(
            name,
            Row {
                folder,
                allowed,
                no_tokio: imports.contains("no tokio"),
            },
        );
    }
    assert!(
        rows.len() >= 8,
        "the table lists the crates: {:?}",
        rows.keys()
    );
    rows
}

/// The non-optional `[dependencies]` of the crate in `folder`.
fn dependencies(folder: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(folder.join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    let Some(deps) = manifest.get("dependencies").and_then(|d| d.as_table()) else {
        return BTreeSet::new();
    };
    deps.iter()
        .filter(|(_, v)| {
            !v.as_table()
                .and_then(|t| t.get("optional"))
                .and_then(toml::Value::as_bool)
                .unwrap_or(false)
        })
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn every_crate_imports_only_what_the_architecture_table_allows() {
    let rows = table();
    let mut wrong = Vec::new();
    for (name, row) in &rows {
        let deps = dependencies(&row.folder);
        for d in deps.iter().filter(|d| d.starts_with("tessera")) {
            if !row.allowed.contains(d) {
                wrong.push(format!(
                    "{name} depends on {d}, which its row does not allow"
                ));
            }
        }
        if row.no_tokio && deps.contains("tokio") {
            wrong.push(format!("{name} depends on tokio"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn every_workspace_crate_has_a_row() {
    let rows = table();
    let text = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    for m in members.iter().filter_map(|m| m.as_str()) {
        if !m.starts_with("src/") {
            continue;
        }
        let own: toml::Table =
            toml::from_str(&std::fs::read_to_string(root().join(m).join("Cargo.toml")).unwrap())
                .unwrap();
        let name = own["package"]["name"].as_str().unwrap();
        assert!(rows.contains_key(name), "README's table lacks {name} ({m})");
        assert_eq!(
            rows[name].folder.canonicalize().unwrap(),
            root().join(m).canonicalize().unwrap(),
            "{name}'s folder"
        );
    }
}

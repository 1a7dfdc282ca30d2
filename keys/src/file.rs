//! The tenants file, the default source.

use std::{
    io::Write,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml_edit::{DocumentMut, Item, TableLike};

use crate::{
    AdminError, Change, Stamp, StoreError, TenantAdmin, TenantSource,
    model::{KeySpec, TenantDef, TenantPolicy, Tenants, TenantsError, TimeText},
};

/// Tenants in a TOML file:
///
/// ```toml
/// [[tenants]]
/// name = "acme"
/// models = ["all-minilm-l6-v2"]    # "*" allows every served model
/// rate_per_second = 100
/// burst = 200
/// keys = [{ key_id = "acme-1", public_key = "<64 hex>" }]
///
/// # More keys for a tenant defined above: one [[keys]] table each, naming its tenant.
/// [[keys]]
/// tenant = "acme"
/// key_id = "acme-2"
/// public_key = "<64 hex>"
/// not_before = "2027-01-01T00:00:00Z"   # optional
/// not_after = "2027-07-01T00:00:00Z"    # optional
/// revoked = false                       # optional
/// ```
///
/// Every key, in a `keys` list of its tenant or in a `[[keys]]` table, takes the optional
/// `not_before`, `not_after` (RFC 3339 with an offset, quoted or as TOML date-times) and
/// `revoked`. A `[[tenants]]` block repeated with the same policy adds its keys to the tenant
/// (so appending another `fleet keygen` block works); repeated with a different policy it is
/// refused with the reason.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    tenants: Vec<TenantBlock>,
    #[serde(default)]
    keys: Vec<KeyBlock>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBlock {
    name: String,
    models: Vec<String>,
    rate_per_second: u32,
    burst: u32,
    #[serde(default)]
    keys: Vec<KeySpec>,
}

/// A `[[keys]]` table: a key spec and its tenant (serde's flatten cannot refuse unknown fields,
/// hence the repetition).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBlock {
    tenant: String,
    key_id: String,
    public_key: String,
    #[serde(default)]
    not_before: Option<TimeText>,
    #[serde(default)]
    not_after: Option<TimeText>,
    #[serde(default)]
    revoked: bool,
}

impl Tenants {
    /// Parses and validates a tenants file's text (see [`FileSource`] for the format).
    pub fn from_toml(text: &str) -> Result<Tenants, TenantsError> {
        parse(text, "<inline>")
    }
}

fn parse(text: &str, path: &str) -> Result<Tenants, TenantsError> {
    let doc: FileDoc = toml::from_str(text).map_err(|source| TenantsError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut defs: Vec<TenantDef> = doc
        .tenants
        .into_iter()
        .map(|block| TenantDef {
            name: block.name,
            policy: TenantPolicy {
                models: block.models,
                rate_per_second: block.rate_per_second,
                burst: block.burst,
            },
            keys: block.keys,
        })
        .collect();
    for key in doc.keys {
        let Some(def) = defs.iter_mut().find(|d| d.name == key.tenant) else {
            return Err(TenantsError::UnknownTenant {
                key_id: key.key_id,
                tenant: key.tenant,
            });
        };
        def.keys.push(KeySpec {
            key_id: key.key_id,
            public_key: key.public_key,
            not_before: key.not_before,
            not_after: key.not_after,
            revoked: key.revoked,
        });
    }
    Tenants::build(defs)
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn read_text(&self) -> Result<String, TenantsError> {
        std::fs::read_to_string(&self.path).map_err(|source| TenantsError::Read {
            path: self.shown(),
            source,
        })
    }

    /// Reads and validates the file now.
    pub fn read(&self) -> Result<Tenants, TenantsError> {
        parse(&self.read_text()?, &self.shown())
    }

    /// The file's text; None when it does not exist.
    fn current_text(&self) -> Result<Option<String>, AdminError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::from(TenantsError::Read {
                path: self.shown(),
                source,
            })
            .into()),
        }
    }

    fn apply_now(&self, change: &Change) -> Result<(), AdminError> {
        let before = self.current_text()?;
        // The first tenant added makes the file.
        let text = before.as_deref().unwrap_or_default();
        let current = parse(text, &self.shown()).map_err(StoreError::from)?;
        change.check(&current)?;
        let mut doc: DocumentMut = text.parse().map_err(|e| AdminError::Unsupported {
            path: self.shown(),
            reason: format!("{e}"),
        })?;
        self.edit(&mut doc, change)?;
        let edited = doc.to_string();
        parse(&edited, &self.shown()).map_err(AdminError::Invalid)?;
        // Another edit that landed since the read would be lost by the rename: refuse instead,
        // as the Vault backend's check-and-set does.
        let unchanged = || matches!(self.current_text(), Ok(now) if now == before);
        match write_atomically(&self.path, &edited, unchanged) {
            Ok(true) => Ok(()),
            Ok(false) => Err(AdminError::Conflict(format!(
                "tenants file {}",
                self.shown()
            ))),
            Err(source) => Err(AdminError::Write {
                path: self.shown(),
                source,
            }),
        }
    }

    /// Edits the document in place, so comments and layout around the change survive.
    fn edit(&self, doc: &mut DocumentMut, change: &Change) -> Result<(), AdminError> {
        match change {
            Change::AddTenant {
                tenant,
                policy,
                key,
            } => {
                let mut block = toml_edit::Table::new();
                block.insert("name", toml_edit::value(tenant.as_str()));
                block.insert(
                    "models",
                    toml_edit::value(policy.models.iter().collect::<toml_edit::Array>()),
                );
                block.insert(
                    "rate_per_second",
                    toml_edit::value(i64::from(policy.rate_per_second)),
                );
                block.insert("burst", toml_edit::value(i64::from(policy.burst)));
                let mut keys = toml_edit::Array::new();
                keys.push(key_table(&KeySpec::new(key), None).into_inline_table());
                block.insert("keys", toml_edit::value(keys));
                self.tables(doc, "tenants")?.push(block);
            }
            Change::AddKey {
                tenant,
                key,
                retire,
            } => {
                let table = key_table(&KeySpec::new(key), Some(tenant));
                self.tables(doc, "keys")?.push(table);
                if let Some(retire) = retire {
                    let until = TimeText::from_ms(retire.not_after_ms).0;
                    self.set_on_key(doc, &retire.key_id, "not_after", until.into())?;
                }
            }
            Change::Retire(retire) => {
                let until = TimeText::from_ms(retire.not_after_ms).0;
                self.set_on_key(doc, &retire.key_id, "not_after", until.into())?;
            }
            Change::Revoke { key_id } => {
                self.set_on_key(doc, key_id, "revoked", true.into())?;
            }
        }
        Ok(())
    }

    /// The top-level `[[name]]` array of tables, created when missing.
    fn tables<'d>(
        &self,
        doc: &'d mut DocumentMut,
        name: &str,
    ) -> Result<&'d mut toml_edit::ArrayOfTables, AdminError> {
        let item = doc
            .entry(name)
            .or_insert(Item::ArrayOfTables(Default::default()));
        item.as_array_of_tables_mut()
            .ok_or_else(|| AdminError::Unsupported {
                path: self.shown(),
                reason: format!("`{name}` is not written as [[{name}]] tables"),
            })
    }

    /// Sets `field` on the key's entry, wherever the file holds it: in a tenant's inline `keys`
    /// list, in `[[tenants.keys]]` tables, or in a top-level `[[keys]]` table.
    fn set_on_key(
        &self,
        doc: &mut DocumentMut,
        key_id: &str,
        field: &str,
        value: toml_edit::Value,
    ) -> Result<(), AdminError> {
        let mut inline: Vec<&mut toml_edit::InlineTable> = Vec::new();
        let mut tables: Vec<&mut toml_edit::Table> = Vec::new();
        for (name, item) in doc.as_table_mut().iter_mut() {
            match (name.get(), item) {
                ("tenants", Item::ArrayOfTables(tenants)) => {
                    for tenant in tenants.iter_mut() {
                        match tenant.get_mut("keys") {
                            Some(Item::Value(toml_edit::Value::Array(list))) => inline
                                .extend(list.iter_mut().filter_map(|v| v.as_inline_table_mut())),
                            Some(Item::ArrayOfTables(keys)) => tables.extend(keys.iter_mut()),
                            _ => {}
                        }
                    }
                }
                ("keys", Item::ArrayOfTables(keys)) => tables.extend(keys.iter_mut()),
                _ => {}
            }
        }
        let is_key = |t: &dyn TableLike| t.get("key_id").and_then(Item::as_str) == Some(key_id);
        if let Some(entry) = inline.into_iter().find(|t| is_key(&**t)) {
            entry.insert(field, value);
            // Normalizes the spacing the inline table had around what was its last value.
            entry.fmt();
        } else if let Some(entry) = tables.into_iter().find(|t| is_key(&**t)) {
            entry.insert(field, Item::Value(value));
        } else {
            return Err(AdminError::Unsupported {
                path: self.shown(),
                reason: format!("cannot find the entry of key {key_id:?}"),
            });
        }
        Ok(())
    }
}

/// A key as a `[[keys]]` table (with its tenant) or, converted, an inline table of a tenant's
/// `keys` list (without).
fn key_table(spec: &KeySpec, tenant: Option<&str>) -> toml_edit::Table {
    let mut table = toml_edit::Table::new();
    if let Some(tenant) = tenant {
        table.insert("tenant", toml_edit::value(tenant));
    }
    table.insert("key_id", toml_edit::value(spec.key_id.as_str()));
    table.insert("public_key", toml_edit::value(spec.public_key.as_str()));
    for (field, time) in [
        ("not_before", &spec.not_before),
        ("not_after", &spec.not_after),
    ] {
        if let Some(time) = time {
            table.insert(field, toml_edit::value(time.0.as_str()));
        }
    }
    table
}

/// Replaces the file in one step: a reader sees the old file or the new one, never a part.
/// The new file keeps the old one's permissions and, where allowed, its owner (a new file is
/// 0644: it holds public keys only); a symbolic link is followed, so the file it points to is
/// replaced and the link kept.
/// `unchanged` is asked last, just before the rename; when it says no, nothing is replaced and
/// the answer is false.
fn write_atomically(
    path: &Path,
    text: &str,
    unchanged: impl FnOnce() -> bool,
) -> std::io::Result<bool> {
    let (target, old) = match std::fs::canonicalize(path) {
        Ok(real) => {
            let meta = std::fs::metadata(&real)?;
            (real, Some(meta))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path.to_owned(), None),
        Err(e) => return Err(e),
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".fleet-tenants")
        .tempfile_in(dir)?;
    match &old {
        Some(meta) => {
            tmp.as_file().set_permissions(meta.permissions())?;
            let owner =
                std::os::unix::fs::fchown(tmp.as_file(), Some(meta.uid()), Some(meta.gid()));
            if let Err(e) = owner {
                tracing::warn!(
                    path = %target.display(),
                    error = %e,
                    "the rewritten tenants file could not keep its owner"
                );
            }
        }
        None => tmp
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?,
    }
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    if !unchanged() {
        return Ok(false);
    }
    tmp.persist(&target).map_err(|e| e.error)?;
    // Makes the rename itself durable.
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

impl TenantSource for FileSource {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn load(&self) -> Result<Tenants, StoreError> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || source.read())
            .await
            .unwrap_or_else(|e| {
                Err(TenantsError::Read {
                    path: self.shown(),
                    source: std::io::Error::other(e),
                })
            })
            .map_err(StoreError::from)
    }

    fn stamp(&self) -> Option<Stamp> {
        // Follows a symbolic link, so a link switched to another file (as Kubernetes does with
        // mounted ConfigMaps) is a change too.
        let m = std::fs::metadata(&self.path).ok()?;
        Some(Stamp([
            m.dev() as i64,
            m.ino() as i64,
            m.size() as i64,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime_nsec(),
        ]))
    }
}

impl TenantAdmin for FileSource {
    async fn apply(&self, change: Change) -> Result<(), AdminError> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || source.apply_now(&change))
            .await
            .unwrap_or_else(|e| {
                Err(AdminError::Write {
                    path: self.shown(),
                    source: std::io::Error::other(e),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_by_someone_else_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        std::fs::write(&path, "# theirs\n").unwrap();
        let replaced = write_atomically(&path, "# mine\n", || false).unwrap();
        assert!(!replaced);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# theirs\n");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );

        assert!(write_atomically(&path, "# mine\n", || true).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# mine\n");
    }

    #[test]
    fn a_symbolic_link_is_kept_and_its_target_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        let link = dir.path().join("tenants.toml");
        std::fs::write(&real, "# old\n").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(write_atomically(&link, "# new\n", || true).unwrap());
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "# new\n");
    }
}

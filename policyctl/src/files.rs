//! Reading operator files: YAML or JSON policy documents (one or many, separated by `---`),
//! ClusterLink's objects among them (see `agents::clusterlink`), and subscription lists, with
//! errors that name the file, the document and, for ClusterLink's, the object.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use agents::clusterlink;
use anyhow::{bail, Context};
use bus::admin::{PolicyRef, Subscription};
use bus::origin::Origin;
use bus::Value;
use serde::Deserialize;

/// The path that stands for standard input, as kubectl's `-f -`.
pub const STDIN: &str = "-";

/// One policy document and where it came from, to name it in errors.
#[derive(Debug)]
pub struct Doc {
    pub file: PathBuf,
    /// 1-based position in its file.
    pub index: usize,
    /// 1-based position in its document, when the document is a list (as `policy list -o
    /// json` or `kubectl get -o yaml` print).
    pub item: Option<usize>,
    /// The ClusterLink object the document was made from.
    pub origin: Option<Origin>,
    pub value: Value,
}

impl Doc {
    pub fn place(&self) -> String {
        let mut s = format!("{}: document {}", shown(&self.file), self.index);
        if let Some(item) = self.item {
            s.push_str(&format!(", item {item}"));
        }
        if let Some(origin) = &self.origin {
            s.push_str(&format!(" ({origin})"));
        }
        s
    }
}

fn shown(file: &Path) -> String {
    if file == Path::new(STDIN) {
        "standard input".into()
    } else {
        file.display().to_string()
    }
}

/// A file's text; `-` reads standard input.
pub fn read_text(file: &Path) -> anyhow::Result<String> {
    if file == Path::new(STDIN) {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

/// Reads every document of every file, checking the fields every policy needs (`agent`,
/// `id`) here so a typo is reported before anything is sent. A document that is a list holds
/// policies (what `policy list --json` prints), so a listing can be applied back.
pub fn read_policies(files: &[PathBuf]) -> anyhow::Result<Vec<Doc>> {
    let docs = read_policy_docs(files)?;
    if docs.is_empty() {
        bail!(
            "no policy documents in {}",
            files
                .iter()
                .map(|f| shown(f))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(docs)
}

/// [`read_policies`], where no document at all is not an error. ClusterLink's objects become
/// the engine documents `agents::clusterlink` makes of them; Kubernetes lists (`kind: List`,
/// `AccessPolicyList`, ...) are read item by item.
pub fn read_policy_docs(files: &[PathBuf]) -> anyhow::Result<Vec<Doc>> {
    let read = read_policy_docs_skipping(files)?;
    match read.refused.into_iter().next() {
        Some(r) => Err(anyhow::anyhow!("{}", r.message)),
        None => Ok(read.docs),
    }
}

/// A document refused before anything was sent, under `--keep-going`.
#[derive(Debug)]
pub struct Refused {
    /// Where it is and why, as the error without `--keep-going` would say.
    pub message: String,
    /// The stored policy it would have replaced, which stays as it is.
    pub keep: Option<PolicyRef>,
}

/// [`read_policy_docs`], setting aside the documents that are refused one by one (a bad
/// object, a document without `agent` or `id`) rather than failing: what `apply --keep-going`
/// reads. A file that cannot be read or parsed still fails: nothing of it can be told apart.
pub fn read_policy_docs_skipping(files: &[PathBuf]) -> anyhow::Result<Read> {
    let mut docs = Vec::new();
    let mut refused = Vec::new();
    let mut documents = 0;
    for file in files {
        let text = read_text(file)?;
        for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let index = i + 1;
            let value = Value::deserialize(de).map_err(|e| {
                anyhow::anyhow!("{}: document {index}: not valid YAML: {e}", shown(file))
            })?;
            let items = match value {
                Value::Nil => continue, // an empty document, as after a trailing `---`
                Value::Array(items) => numbered(items),
                value => match list_items(&value) {
                    Some(items) => numbered(items),
                    None => vec![(None, value)],
                },
            };
            documents += 1;
            for (item, value) in items {
                let at = Doc {
                    file: file.clone(),
                    index,
                    item,
                    origin: None,
                    value,
                };
                let translated = match clusterlink_object(&at) {
                    Ok(t) => t,
                    Err(e) => {
                        refused.push(Refused {
                            message: format!("{e:#}"),
                            keep: clusterlink_id(&at.value),
                        });
                        continue;
                    }
                };
                if let Some(t) = translated {
                    for value in t.policies {
                        docs.push(Doc {
                            origin: Some(t.origin.clone()),
                            value,
                            file: at.file.clone(),
                            ..at
                        });
                    }
                    continue;
                }
                match PolicyRef::of(&at.value) {
                    Ok(_) => docs.push(at),
                    Err(e) => refused.push(Refused {
                        message: format!("{}: {e}", at.place()),
                        keep: None,
                    }),
                }
            }
        }
    }
    Ok(Read {
        docs,
        refused,
        documents,
    })
}

/// What [`read_policy_docs_skipping`] read.
pub struct Read {
    pub docs: Vec<Doc>,
    pub refused: Vec<Refused>,
    /// Top-level documents seen, an empty list among them: none at all means an empty input
    /// (the command feeding it failed, say), which never prunes.
    pub documents: usize,
}

/// The engine policy a ClusterLink object would be, when its kind and name say.
fn clusterlink_id(value: &Value) -> Option<PolicyRef> {
    let json = serde_json::to_value(value).ok()?;
    let (agent, id) = clusterlink::policy_of(&json)?;
    Some(PolicyRef {
        agent: agent.into(),
        id,
    })
}

/// A Kubernetes list's items (`kind: List`, `AccessPolicyList`, ... with `items`), as
/// `kubectl get ... -o yaml` prints them.
fn list_items(value: &Value) -> Option<Vec<Value>> {
    let Value::Map(entries) = value else {
        return None;
    };
    let field = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    };
    let kind = field("kind")?.as_str()?;
    match field("items")? {
        Value::Array(items) if kind.ends_with("List") => Some(items.clone()),
        _ => None,
    }
}

/// The engine documents a ClusterLink object becomes; `None` for any other document.
fn clusterlink_object(doc: &Doc) -> anyhow::Result<Option<clusterlink::Translated>> {
    let is_map_with_api = matches!(&doc.value, Value::Map(m) if m.iter().any(|(k, _)| k.as_str() == Some("apiVersion")));
    if !is_map_with_api {
        return Ok(None);
    }
    let json = serde_json::to_value(&doc.value)
        .map_err(|e| anyhow::anyhow!("{}: not a Kubernetes object: {e}", doc.place()))?;
    if !clusterlink::is_clusterlink(&json) {
        return Ok(None);
    }
    clusterlink::translate(&json)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: {e}", doc.place()))
}

fn numbered(items: Vec<Value>) -> Vec<(Option<usize>, Value)> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| (Some(i + 1), v))
        .collect()
}

/// The dispatcher names a bad document by its position in the request (`document K (...)`);
/// this puts the file and the position in that file in its place.
pub fn locate(message: &str, docs: &[Doc]) -> String {
    let parsed = message.strip_prefix("document ").and_then(|rest| {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        Some((rest[..digits].parse::<usize>().ok()?, &rest[digits..]))
    });
    match parsed {
        Some((k, rest)) if k >= 1 && k <= docs.len() => format!("{}{rest}", docs[k - 1].place()),
        _ => message.to_string(),
    }
}

/// Sends the documents in `policy-add` requests of at most `MAX_POLICIES_PER_ADD` (the
/// dispatcher's limit), each validated whole and stored in one step, and reports a rejected one
/// by its file and position. A load of several batches says how far it got, on standard error,
/// and which batches an error left stored.
pub async fn add_policies(
    admin: &bus::AdminClient,
    docs: &[Doc],
) -> anyhow::Result<bus::admin::PolicyAdded> {
    let batches: Vec<&[Doc]> = docs.chunks(bus::admin::MAX_POLICIES_PER_ADD).collect();
    let mut all = bus::admin::PolicyAdded {
        stored: Vec::new(),
        unchanged: Vec::new(),
    };
    let mut done = 0;
    for (n, batch) in batches.iter().enumerate() {
        let values = batch.iter().map(|d| d.value.clone()).collect();
        match admin.policy_add_detailed(values).await {
            Ok(added) => {
                all.stored.extend(added.stored);
                all.unchanged.extend(added.unchanged);
            }
            Err(bus::ClientError::Remote(e)) => {
                let left = match n {
                    0 => "nothing was stored".to_string(),
                    _ => format!(
                        "nothing of this batch was stored; the {done} documents before it were"
                    ),
                };
                return Err(anyhow::anyhow!("{}; {left}", locate(&e.message, batch)));
            }
            Err(e) => return Err(e.into()),
        }
        done += batch.len();
        if batches.len() > 1 {
            eprintln!(
                "stored {done} of {} documents (batch {} of {})",
                docs.len(),
                n + 1,
                batches.len()
            );
        }
    }
    Ok(all)
}

/// A subscriptions file: a YAML list of `{event, agent, priority, timeout_ms, failure, observe}`.
pub fn read_subscriptions(file: &Path) -> anyhow::Result<Vec<Subscription>> {
    let text = read_text(file)?;
    let subs: Vec<Subscription> = serde_norway::from_str(&text)
        .with_context(|| format!("{}: not a list of subscriptions", file.display()))?;
    for s in &subs {
        s.validate()
            .map_err(|e| anyhow::anyhow!("{}: {}/{}: {e}", file.display(), s.event, s.agent))?;
    }
    Ok(subs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.yaml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn multi_document_files_are_read_in_order() {
        let (_d, p) = write("agent: acl\nid: a\naction: allow\n---\nagent: lb\nid: b\ndst_service: x\nscheme: random\n---\n");
        let docs = read_policies(std::slice::from_ref(&p)).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].index, 2);
        assert_eq!(PolicyRef::of(&docs[1].value).unwrap().agent, "lb");
    }

    #[test]
    fn a_list_document_holds_policies_as_policy_list_prints_them() {
        let (_d, p) = write(r#"[{"agent": "acl", "id": "a"}, {"agent": "lb", "id": "b"}]"#);
        let docs = read_policies(std::slice::from_ref(&p)).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[1].index, docs[1].item), (1, Some(2)));
        assert!(docs[1].place().ends_with("document 1, item 2"));
        let (_d, p) = write(r#"[{"agent": "acl", "id": "a"}, {"agent": "acl"}]"#);
        let err = read_policies(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("document 1, item 2") && err.contains("`id`"),
            "{err}"
        );
    }

    #[test]
    fn clusterlink_objects_are_read_from_every_shape_kubectl_prints() {
        let ap = |name: &str| {
            format!(
                r#"{{"apiVersion": "clusterlink.net/v1alpha1", "kind": "AccessPolicy",
                    "metadata": {{"name": "{name}", "namespace": "ns"}},
                    "spec": {{"action": "allow", "from": [{{"workloadSelector": {{}}}}],
                              "to": [{{"workloadSelector": {{}}}}]}}}}"#
            )
        };
        let typed_list = format!(
            r#"{{"apiVersion": "clusterlink.net/v1alpha1", "kind": "AccessPolicyList", "items": [{}, {}]}}"#,
            ap("a"),
            ap("b")
        );
        let (_d, p) = write(&format!("{typed_list}\n---\n{}\n", ap("c")));
        let docs = read_policies(std::slice::from_ref(&p)).unwrap();
        let places: Vec<String> = docs.iter().map(Doc::place).collect();
        assert_eq!(docs.len(), 3, "{places:?}");
        assert!(
            places[1].ends_with("document 1, item 2 (AccessPolicy ns/b)"),
            "{places:?}"
        );
        assert!(
            places[2].ends_with("document 2 (AccessPolicy ns/c)"),
            "{places:?}"
        );
        assert_eq!(PolicyRef::of(&docs[2].value).unwrap().id, "cl-ap__ns__c");
        // A plain engine list and a ClusterLink object side by side.
        let (_d, p) = write(&format!(
            "{}\n---\n[{{\"agent\": \"acl\", \"id\": \"x\"}}]\n",
            ap("d")
        ));
        assert_eq!(read_policies(std::slice::from_ref(&p)).unwrap().len(), 2);
        // Under --keep-going a refused object is set aside, naming what it would replace.
        let bad = ap("e").replace("\"allow\"", "\"maybe\"");
        let (_d, p) = write(&format!("{bad}\n---\n{}\n", ap("f")));
        assert!(read_policy_docs(std::slice::from_ref(&p)).is_err());
        let crate::files::Read { docs, refused, .. } =
            read_policy_docs_skipping(std::slice::from_ref(&p)).unwrap();
        assert_eq!(docs.len(), 1);
        assert!(
            refused[0]
                .message
                .contains("AccessPolicy ns/e: spec.action"),
            "{refused:?}"
        );
        assert_eq!(
            refused[0].keep.as_ref().map(|r| r.id.as_str()),
            Some("cl-ap__ns__e")
        );
    }

    #[test]
    fn errors_name_file_and_document() {
        let (_d, p) = write("agent: acl\nid: a\n---\nagent: acl\naction: deny\n");
        let err = read_policies(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yaml: document 2") && err.contains("`id`"),
            "{err}"
        );
        let (_d, p) = write("agent: [unclosed\n");
        let err = read_policies(std::slice::from_ref(&p))
            .unwrap_err()
            .to_string();
        assert!(err.contains("document 1: not valid YAML"), "{err}");
    }

    #[test]
    fn dispatcher_positions_map_back_to_files() {
        let (_d, p) = write("agent: acl\nid: a\n---\nagent: acl\nid: b\n");
        let docs = read_policies(std::slice::from_ref(&p)).unwrap();
        let msg = locate("document 2 (acl/b): field `action`: missing", &docs);
        assert!(
            msg.ends_with("p.yaml: document 2 (acl/b): field `action`: missing"),
            "{msg}"
        );
        assert_eq!(locate("something else", &docs), "something else");
        let msg = locate("document 2: acl/b is also document 1", &docs);
        assert!(
            msg.ends_with("p.yaml: document 2: acl/b is also document 1"),
            "{msg}"
        );
    }
}

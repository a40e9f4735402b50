//! The table schemas shipped in the binary (from `schemas/`), as flat JSON Schemas whose first
//! property is the primary key.

include!(concat!(env!("OUT_DIR"), "/bundled_schemas.rs"));

/// The namespaces that have bundled tables, sorted.
pub fn namespaces() -> Vec<&'static str> {
    let mut names: Vec<_> = BUNDLED.iter().map(|(ns, _, _)| *ns).collect();
    names.dedup();
    names
}

/// The bundled tables of one namespace, sorted, with their flat schemas.
pub fn tables(namespace: &str) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    BUNDLED.iter().filter(move |(ns, _, _)| *ns == namespace).map(|(_, table, json)| (*table, *json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_namespace_is_bundled() {
        assert_eq!(namespaces(), ["canvas", "canvas_logs", "catalog"]);
        assert_eq!(tables("canvas").count(), 91);
        assert_eq!(tables("canvas_logs").map(|t| t.0).collect::<Vec<_>>(), ["web_logs"]);
        assert_eq!(tables("catalog").count(), 28);
    }
}

//! Server file export and verification: atomic writes, overwrite rules,
//! privileges, the allowed directory, and the verifier.

#[pgrx::pg_schema]
mod tests {
    use crate::pgrx_tests::support::{make_items, sqlstate_of};
    use pgrx::prelude::*;
    use std::path::PathBuf;

    /// A fresh directory the server can write, unique to this test.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pse-file-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn bytes_export_hex(options: &str) -> String {
        Spi::get_one(&format!(
            "SELECT coalesce(string_agg(encode(c, 'hex'), ''), '') FROM (SELECT stream_export_bytes('items'{options}) c) s"
        ))
        .unwrap()
        .unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[pg_test]
    fn file_bytes_equal_the_byte_stream() {
        make_items(5000);
        let dir = scratch_dir("equal");
        let plain = dir.join("items.ndjson");
        let row: (Option<String>, Option<i64>) = Spi::get_two(&format!(
            "SELECT path, rows FROM stream_export_to_file('items', '{}', key => 'id', footer => true)",
            plain.display()
        ))
        .unwrap();
        assert_eq!(row.0.as_deref(), Some(plain.to_str().unwrap()));
        assert_eq!(row.1, Some(5000));
        let written = std::fs::read(&plain).unwrap();
        assert_eq!(
            hex(&written),
            bytes_export_hex(", key => 'id', footer => true")
        );
        // gzip: same bytes as the gzip byte stream (members are deterministic).
        let gz = dir.join("items.ndjson.gz");
        let (bytes, file_bytes): (Option<i64>, Option<i64>) = Spi::get_two(&format!(
            "SELECT bytes, file_bytes FROM stream_export_to_file('items', '{}', compression => 'gzip', footer => true)",
            gz.display()
        ))
        .unwrap();
        let written = std::fs::read(&gz).unwrap();
        assert_eq!(file_bytes, Some(written.len() as i64));
        assert!(bytes.unwrap() > file_bytes.unwrap());
        assert_eq!(
            hex(&written),
            bytes_export_hex(", compression => 'gzip', footer => true")
        );
        for path in [&plain, &gz] {
            let verdict: (Option<bool>, Option<String>) = Spi::get_two(&format!(
                "SELECT ok, detail FROM stream_export_verify('{}')",
                path.display()
            ))
            .unwrap();
            assert_eq!(verdict.0, Some(true), "{:?}", verdict.1);
        }
        assert!(!dir.join("items.ndjson.partial").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[pg_test]
    fn existing_targets_and_partial_files_are_respected() {
        make_items(10);
        let dir = scratch_dir("exists");
        let target = dir.join("out.ndjson");
        std::fs::write(&target, b"old contents\n").unwrap();
        let export = |extra: &str| {
            sqlstate_of(&format!(
                "SELECT stream_export_to_file('items', '{}'{extra})",
                target.display()
            ))
        };
        assert_eq!(export(""), "58P02");
        assert_eq!(std::fs::read(&target).unwrap(), b"old contents\n");
        // A failing export with overwrite leaves the old file alone.
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export_to_file('SELECT 1/(id - 5) FROM items', '{}', overwrite => true)",
                target.display()
            )),
            "22012"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"old contents\n");
        assert!(!dir.join("out.ndjson.partial").exists());
        // Something at the partial path is never followed or overwritten.
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, b"precious").unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("out.ndjson.partial")).unwrap();
        assert_eq!(export(", overwrite => true"), "58P02");
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"precious");
        std::fs::remove_file(dir.join("out.ndjson.partial")).unwrap();
        assert_eq!(export(", overwrite => true"), "ok");
        assert_eq!(
            std::fs::read_to_string(&target).unwrap().lines().count(),
            10
        );
        // Missing directory, relative path.
        assert_eq!(
            sqlstate_of("SELECT stream_export_to_file('items', '/nonexistent/dir/x.ndjson')"),
            "58P01"
        );
        assert_eq!(
            sqlstate_of("SELECT stream_export_to_file('items', 'relative.ndjson')"),
            "42501"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[pg_test]
    fn only_privileged_roles_write_or_read_files() {
        make_items(3);
        let dir = scratch_dir("privileges");
        Spi::run(
            "CREATE ROLE pse_plain NOLOGIN; GRANT SELECT ON items TO pse_plain;
             CREATE ROLE pse_writer NOLOGIN IN ROLE pg_write_server_files; GRANT SELECT ON items TO pse_writer;",
        )
        .unwrap();
        let out = dir.join("p.ndjson");
        sqlstate_of("SELECT 1"); // creates the helper while still superuser
        Spi::run("SET ROLE pse_plain").unwrap();
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export_to_file('items', '{}')",
                out.display()
            )),
            "42501"
        );
        assert_eq!(
            sqlstate_of(&format!("SELECT stream_export_verify('{}')", out.display())),
            "42501"
        );
        assert_eq!(sqlstate_of("SELECT stream_export('items')"), "ok");
        Spi::run("RESET ROLE; SET ROLE pse_writer").unwrap();
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export_to_file('items', '{}')",
                out.display()
            )),
            "ok"
        );
        Spi::run("RESET ROLE").unwrap();
        assert!(out.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[pg_test]
    fn allowed_directory_confines_files() {
        make_items(3);
        let root = scratch_dir("allowed");
        let inside = root.join("inside");
        let outside = root.join("outside");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("link")).unwrap();
        Spi::run(&format!(
            "SET pg_stream_export.allowed_directory = '{}'",
            inside.display()
        ))
        .unwrap();
        let try_path =
            |p: String| sqlstate_of(&format!("SELECT stream_export_to_file('items', '{p}')"));
        assert_eq!(try_path(format!("{}/ok.ndjson", inside.display())), "ok");
        assert_eq!(
            try_path(format!("{}/../outside/escape.ndjson", inside.display())),
            "42501"
        );
        assert_eq!(
            try_path(format!("{}/link/escape.ndjson", inside.display())),
            "42501"
        );
        assert_eq!(
            try_path(format!("{}/direct.ndjson", outside.display())),
            "42501"
        );
        assert!(!outside.join("escape.ndjson").exists());
        Spi::run("RESET pg_stream_export.allowed_directory").unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    #[pg_test]
    fn verify_reports_damaged_files_without_raising() {
        make_items(300);
        let dir = scratch_dir("verify");
        let good = dir.join("good.ndjson");
        Spi::run(&format!(
            "SELECT stream_export_to_file('items', '{}', footer => true)",
            good.display()
        ))
        .unwrap();
        let original = std::fs::read(&good).unwrap();
        let check = |bytes: &[u8], name: &str| -> (bool, String) {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            let (ok, detail): (Option<bool>, Option<String>) = Spi::get_two(&format!(
                "SELECT ok, detail FROM stream_export_verify('{}')",
                path.display()
            ))
            .unwrap();
            (ok.unwrap(), detail.unwrap())
        };
        assert!(check(&original, "copy.ndjson").0);
        let mut flipped = original.clone();
        flipped[100] ^= 0x02;
        let (ok, detail) = check(&flipped, "flipped.ndjson");
        assert!(!ok && detail.contains("CRC-32"), "{detail}");
        let text = String::from_utf8(original.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let cut_last_record = format!(
            "{}\n{}\n",
            lines[..lines.len() - 2].join("\n"),
            lines[lines.len() - 1]
        );
        let (ok, detail) = check(cut_last_record.as_bytes(), "cut.ndjson");
        assert!(!ok && detail.contains("299 rows"), "{detail}");
        let (ok, detail) = check(
            format!("{}\n", lines[..lines.len() - 1].join("\n")).as_bytes(),
            "nofooter.ndjson",
        );
        assert!(!ok && detail.contains("no footer"), "{detail}");
        let mut appended = original.clone();
        appended.extend_from_slice(b"{\"extra\":1}\n");
        let (ok, detail) = check(&appended, "appended.ndjson");
        assert!(!ok && detail.contains("appended"), "{detail}");
        let gz = dir.join("good.ndjson.gz");
        Spi::run(&format!(
            "SELECT stream_export_to_file('items', '{}', footer => true, compression => 'gzip')",
            gz.display()
        ))
        .unwrap();
        let mut corrupt = std::fs::read(&gz).unwrap();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        assert!(!check(&corrupt, "corrupt.ndjson.gz").0);
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export_verify('{}/missing')",
                dir.display()
            )),
            "58P01"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

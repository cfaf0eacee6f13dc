//! The streaming API: options, keyset walks, footer, resume tokens and the
//! byte stream.

#[pgrx::pg_schema]
mod tests {
    use crate::pgrx_tests::support::{lines, make_items, sqlstate_of};
    use pgrx::prelude::*;

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = crc32fast::Hasher::new();
        crc.update(bytes);
        crc.finalize()
    }

    #[pg_test]
    fn bad_options_are_22023() {
        make_items(10);
        Spi::run("CREATE TABLE nokey (id int, v text); CREATE TABLE nullable (id int UNIQUE)")
            .unwrap();
        for (statement, state) in [
            ("SELECT stream_export_bytes('items', compression => 'lz4')", "22023"),
            ("SELECT stream_export_bytes('items', compression => 'gzip', compression_level => 10)", "22023"),
            ("SELECT stream_export_bytes('items', compression_level => -1)", "22023"),
            ("SELECT stream_export('items', batch_size => -1)", "22023"),
            ("SELECT stream_export_bytes('items', chunk_size => 10)", "22023"),
            ("SELECT stream_export('items', compression => 'gzip')", "22023"),
            ("SELECT stream_export('items', after => 'x')", "22023"),
            ("SELECT stream_export('items', key_from => '1')", "22023"),
            ("SELECT stream_export('items', key => 'nope')", "42703"),
            ("SELECT stream_export('items', key => 'ID')", "42703"),
            ("SELECT stream_export('nokey', key => 'id')", "22023"),
            ("SELECT stream_export('nullable', key => 'id')", "22023"),
            ("SELECT stream_export('items', key => 'id', key_from => 'abc')", "22P02"),
            ("SELECT stream_export('SELECT 1/(g - 1000) FROM generate_series(1, 2000) g')", "22012"),
            ("SELECT stream_export('SELECT g % 3 AS k FROM generate_series(1, 10) g', key => 'k')", "22023"),
            ("SELECT stream_export('SELECT NULL::int AS k', key => 'k')", "22023"),
            ("SELECT stream_export('items', key => 'id')", "ok"),
        ] {
            assert_eq!(sqlstate_of(statement), state, "{statement}");
        }
    }

    #[pg_test]
    fn keyset_walk_returns_rows_in_key_order_for_many_key_types() {
        Spi::run(
            "CREATE TABLE k_int (k int PRIMARY KEY, v text);
             CREATE TABLE k_bigint (k bigint PRIMARY KEY, v text);
             CREATE TABLE k_text (k text PRIMARY KEY, v text);
             CREATE TABLE k_uuid (k uuid PRIMARY KEY, v text);
             CREATE TABLE k_tstz (k timestamptz PRIMARY KEY, v text);
             CREATE TABLE k_numeric (k numeric NOT NULL UNIQUE, v text);
             INSERT INTO k_int SELECT g, md5(g::text) FROM generate_series(1, 250) g ORDER BY random();
             INSERT INTO k_bigint SELECT g * 10000000000, md5(g::text) FROM generate_series(-120, 129) g ORDER BY random();
             INSERT INTO k_text SELECT md5(g::text) || E' \\'\"; x', g FROM generate_series(1, 250) g;
             INSERT INTO k_uuid SELECT gen_random_uuid(), g FROM generate_series(1, 250) g;
             INSERT INTO k_tstz SELECT timestamptz '2024-01-01 00:00:00+00' + g * interval '1.5 seconds', g FROM generate_series(1, 250) g ORDER BY random();
             INSERT INTO k_numeric SELECT g / 7.0, g FROM generate_series(1, 250) g;",
        )
        .unwrap();
        for table in [
            "k_int",
            "k_bigint",
            "k_text",
            "k_uuid",
            "k_tstz",
            "k_numeric",
        ] {
            for batch in [0, 1, 7, 250, 1000] {
                let got = lines(&format!(
                    "SELECT stream_export('{table}', key => 'k', batch_size => {batch})"
                ));
                let want = lines(&format!(
                    "SELECT row_to_json(r)::text FROM (SELECT * FROM {table} ORDER BY k) r"
                ));
                assert_eq!(got.len(), 250, "{table} batch {batch}");
                assert_eq!(got, want, "{table} batch {batch}");
            }
        }
    }

    /// Many keyset batches opened during later calls of the set-returning
    /// function, with values that allocate while they are encoded.
    #[pg_test]
    fn many_keyset_batches_across_calls() {
        let query =
            "SELECT g AS k, ARRAY[g::text, repeat(''x'', g % 300)] AS a, ROW(g, ''y'' || g) AS rec, \
                     (g * 1.5)::numeric AS n FROM generate_series(1, 20000) g";
        let got = lines(&format!("SELECT md5(l) FROM (SELECT stream_export('{query}', key => 'k', batch_size => 100) l) s"));
        let want = lines(&format!(
            "SELECT md5(row_to_json(r)::text) FROM ({} ORDER BY k) r",
            query.replace("''", "'")
        ));
        assert_eq!(got.len(), 20000);
        assert_eq!(got, want);
    }

    #[pg_test]
    fn key_bounds_select_a_range() {
        make_items(100);
        let got = lines("SELECT stream_export('items', key => 'id', key_from => '10', key_to => '20', batch_size => 3)");
        let want = lines("SELECT row_to_json(r)::text FROM (SELECT * FROM items WHERE id >= 10 AND id < 20 ORDER BY id) r");
        assert_eq!(got, want);
        assert_eq!(got.len(), 10);
        let open_end = lines("SELECT stream_export('items', key => 'id', key_from => '95')");
        assert_eq!(open_end.len(), 6);
        let open_start = lines("SELECT stream_export('items', key => 'id', key_to => '4')");
        assert_eq!(open_start.len(), 3);
    }

    #[pg_test]
    fn query_sources_walk_by_key_across_batches() {
        let query = "SELECT g AS n, g * 2 AS twice FROM generate_series(1, 95) g";
        let got = lines(&format!(
            "SELECT stream_export('{query}', key => 'n', batch_size => 10)"
        ));
        let want = lines(&format!(
            "SELECT row_to_json(r)::text FROM ({query} ORDER BY n) r"
        ));
        assert_eq!(got, want);
        // A duplicate exactly at a batch boundary is still noticed.
        let dup = "SELECT CASE WHEN g = 11 THEN 10 ELSE g END AS n FROM generate_series(1, 30) g";
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export('{dup}', key => 'n', batch_size => 10)"
            )),
            "22023"
        );
    }

    #[pg_test]
    fn footer_counts_rows_bytes_and_crc() {
        make_items(1234);
        for key in ["NULL", "'id'"] {
            let all = lines(&format!(
                "SELECT stream_export('items', key => {key}, footer => true, batch_size => 100)"
            ));
            let (footer, records) = all.split_last().unwrap();
            assert_eq!(records.len(), 1234);
            let body: String = records.iter().map(|l| format!("{l}\n")).collect();
            let parsed: pgrx::JsonB =
                Spi::get_one_with_args("SELECT $1::jsonb", &[footer.as_str().into()])
                    .unwrap()
                    .unwrap();
            let meta = &parsed.0["_stream_export"];
            assert_eq!(meta["version"], 1);
            assert_eq!(meta["rows"], 1234);
            assert_eq!(meta["bytes"], body.len() as u64);
            assert_eq!(meta["crc32"], format!("{:08x}", crc32(body.as_bytes())));
            assert_eq!(meta["complete"], true);
            assert_eq!(meta["resume_token"].is_null(), key == "NULL", "{footer}");
        }
    }

    fn footer_token(sql: &str) -> String {
        let all = lines(sql);
        let footer = all.last().unwrap();
        let parsed: pgrx::JsonB =
            Spi::get_one_with_args("SELECT $1::jsonb", &[footer.as_str().into()])
                .unwrap()
                .unwrap();
        parsed.0["_stream_export"]["resume_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[pg_test]
    fn a_broken_stream_resumes_from_its_last_line() {
        make_items(95);
        let full = lines("SELECT stream_export('items', key => 'id', batch_size => 10)");
        for k in [10, 20, 23, 1, 94] {
            // The client received k lines, then the stream broke.
            let received = &full[..k];
            let token: String = Spi::get_one_with_args(
                "SELECT stream_export_resume_token('items', 'id', $1)",
                &[received[k - 1].as_str().into()],
            )
            .unwrap()
            .unwrap();
            let rest = lines(&format!(
                "SELECT stream_export('items', key => 'id', after => '{token}', batch_size => 10)"
            ));
            let mut joined = received.to_vec();
            joined.extend(rest);
            assert_eq!(joined, full, "resumed after {k} rows");
        }
    }

    #[pg_test]
    fn incremental_export_gets_exactly_the_new_rows() {
        make_items(50);
        let token = footer_token("SELECT stream_export('items', key => 'id', footer => true)");
        Spi::run("INSERT INTO items SELECT g, 'new ' || g FROM generate_series(51, 60) g").unwrap();
        let next = lines(&format!(
            "SELECT stream_export('items', key => 'id', after => '{token}', footer => true)"
        ));
        let (footer, new_rows) = next.split_last().unwrap();
        let want = lines(
            "SELECT row_to_json(r)::text FROM (SELECT * FROM items WHERE id > 50 ORDER BY id) r",
        );
        assert_eq!(new_rows, want.as_slice());
        assert!(footer.contains("\"rows\":10"), "{footer}");
        // Nothing new: an empty export whose token still points at row 60.
        let token2 = footer_token(&format!(
            "SELECT stream_export('items', key => 'id', after => '{token}', footer => true)"
        ));
        let empty = lines(&format!(
            "SELECT stream_export('items', key => 'id', after => '{token2}')"
        ));
        assert!(empty.is_empty());
    }

    #[pg_test]
    fn bad_tokens_are_refused_and_inject_nothing() {
        Spi::run(
            "CREATE TABLE t_keys (k text PRIMARY KEY);
             INSERT INTO t_keys VALUES ('a'), ($$it's'; DROP TABLE t_keys; --$$), ('zz');
             CREATE TABLE other (k text PRIMARY KEY);",
        )
        .unwrap();
        let token: String = Spi::get_one(
            "SELECT stream_export_resume_token('t_keys', 'k', '{\"k\":\"it''s''; DROP TABLE t_keys; --\"}')",
        )
        .unwrap()
        .unwrap();
        let rest = lines(&format!(
            "SELECT stream_export('t_keys', key => 'k', after => '{token}')"
        ));
        assert_eq!(rest, vec!["{\"k\":\"zz\"}".to_string()]);
        let still_there: Option<i64> = Spi::get_one("SELECT count(*) FROM t_keys").unwrap();
        assert_eq!(still_there, Some(3));
        let mut tampered = token.clone().into_bytes();
        let mid = tampered.len() / 2;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        for bad in [
            tampered,
            token[..token.len() - 5].to_string(),
            "%%%not base64%%%".into(),
            "c29tZXRoaW5nIGVsc2U".into(),
        ] {
            assert_eq!(
                sqlstate_of(&format!(
                    "SELECT stream_export('t_keys', key => 'k', after => '{bad}')"
                )),
                "22023",
                "{bad}"
            );
        }
        // A token of another export (other source, or other key).
        assert_eq!(
            sqlstate_of(&format!(
                "SELECT stream_export('other', key => 'k', after => '{token}')"
            )),
            "22023"
        );
    }

    #[pg_test]
    fn byte_stream_concatenates_to_the_lines() {
        make_items(3000);
        let text = lines("SELECT stream_export('items', key => 'id', footer => true)");
        let expected: Vec<u8> = text
            .iter()
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect();
        let hex_chunks: Vec<String> = Spi::get_one(
            "SELECT array_agg(encode(c, 'hex')) FROM (SELECT stream_export_bytes('items', key => 'id', footer => true, chunk_size => 4096) c) s",
        )
        .unwrap()
        .unwrap();
        let chunks: Vec<Vec<u8>> = hex_chunks
            .iter()
            .map(|h| {
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect()
            })
            .collect();
        assert!(chunks.len() > 10);
        let (last, full) = chunks.split_last().unwrap();
        assert!(full.iter().all(|c| c.len() == 4096));
        assert!(!last.is_empty() && last.len() <= 4096);
        assert_eq!(chunks.concat(), expected);
    }

    #[pg_test]
    fn gzip_byte_stream_starts_like_gzip_and_is_smaller() {
        make_items(20000);
        let sizes: (Option<i64>, Option<i64>) = Spi::get_two(
            "SELECT (SELECT sum(length(c)) FROM (SELECT stream_export_bytes('items') c) s),
                    (SELECT sum(length(c)) FROM (SELECT stream_export_bytes('items', compression => 'gzip') c) s)",
        )
        .unwrap();
        let (plain, gzip) = (sizes.0.unwrap(), sizes.1.unwrap());
        assert!(gzip < plain / 3, "gzip {gzip} vs plain {plain}");
        let first: Vec<u8> =
            Spi::get_one("SELECT stream_export_bytes('items', compression => 'gzip') LIMIT 1")
                .unwrap()
                .unwrap();
        assert_eq!(&first[..2], &[0x1f, 0x8b]);
    }

    #[pg_test]
    fn wide_rows_export_in_small_batches() {
        Spi::run(
            "CREATE TABLE wide (id int PRIMARY KEY, body text);
             INSERT INTO wide SELECT g, repeat(md5(g::text), 32768) FROM generate_series(1, 40) g;",
        )
        .unwrap();
        let n: Option<i64> = Spi::get_one(
            "SELECT count(*) FROM (SELECT stream_export('wide') l) s WHERE octet_length(l) > 1000000",
        )
        .unwrap();
        assert_eq!(n, Some(40));
        let keyed = lines("SELECT md5(l) FROM (SELECT stream_export('wide', key => 'id') l) s");
        let want =
            lines("SELECT md5(row_to_json(r)::text) FROM (SELECT * FROM wide ORDER BY id) r");
        assert_eq!(keyed, want);
    }
}

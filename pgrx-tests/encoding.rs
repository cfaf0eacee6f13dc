//! The row encoder against its oracle: every exported line must equal
//! `row_to_json(r)::text` for the same row, for every type, under several
//! session settings.

#[pgrx::pg_schema]
pub mod tests {
    use pgrx::prelude::*;

    /// Compare `stream_export(query)` with the oracle over the same query,
    /// line by line in query order; report the first difference.
    fn assert_matches_oracle(query: &str) -> usize {
        let exported: Vec<String> = Spi::get_one_with_args(
            "SELECT coalesce(array_agg(line), '{}') FROM (SELECT stream_export($1) AS line) s",
            &[query.into()],
        )
        .unwrap()
        .unwrap();
        let oracle: Vec<String> = Spi::get_one(&format!(
            "SELECT coalesce(array_agg(row_to_json(oracle_row)::text), '{{}}') FROM ({query}) oracle_row"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(exported.len(), oracle.len(), "row count for {query}");
        for (i, (got, want)) in exported.iter().zip(&oracle).enumerate() {
            if got != want {
                let cut = |s: &str| s.chars().take(2000).collect::<String>();
                panic!(
                    "row {i} of {query} differs\n got: {}\nwant: {}",
                    cut(got),
                    cut(want)
                );
            }
        }
        exported.len()
    }

    const SETUP: &str = r#"
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy "quoted"');
        CREATE TYPE castmood AS ENUM ('a', 'b');
        CREATE FUNCTION castmood_to_json(castmood) RETURNS json
            LANGUAGE sql IMMUTABLE AS $$ SELECT json_build_object('custom', $1::text) $$;
        CREATE CAST (castmood AS json) WITH FUNCTION castmood_to_json(castmood);
        CREATE TYPE inner_t AS (x int, label text, at timestamptz);
        CREATE TYPE outer_t AS (id int, inner_v inner_t, tags text[], inners inner_t[]);
        CREATE DOMAIN posint AS int CHECK (VALUE > 0);
        CREATE DOMAIN int_list AS int[];
        CREATE DOMAIN short_text AS varchar(20);
        CREATE TABLE torture (
            id int PRIMARY KEY,
            c_int2 int2, c_int4 int4, c_int8 int8, c_oid oid, c_bool bool,
            c_float4 float4, c_float8 float8, c_numeric numeric, c_money_like numeric(12,2),
            c_text text, c_varchar varchar(10), c_bpchar char(5), c_name name, c_char "char",
            c_json json, c_jsonb jsonb, c_uuid uuid,
            c_date date, c_timestamp timestamp, c_timestamptz timestamptz, c_ts3 timestamp(3),
            c_time time, c_timetz timetz, c_interval interval,
            c_bytea bytea, c_money money, c_bit bit(4), c_varbit varbit,
            c_inet inet, c_cidr cidr, c_macaddr macaddr,
            c_point point, c_box box, c_circle circle, c_path path,
            c_tsvector tsvector, c_tsquery tsquery, c_xml xml,
            c_int4range int4range, c_tstzrange tstzrange,
            c_mood mood, c_castmood castmood, c_outer outer_t,
            c_int_arr int[], c_text_arr text[], c_2d int[], c_3d text[], c_outer_arr outer_t[],
            c_posint posint, c_int_list int_list, c_short short_text,
            c_float8_arr float8[], c_numeric_arr numeric[], c_date_arr date[],
            c_tstz_arr timestamptz[], c_uuid_arr uuid[], c_bool_arr bool[], c_jsonb_arr jsonb[],
            c_json_arr json[], c_mood_arr mood[], c_bounds int[], c_int2_arr int2[], c_oid_arr oid[],
            "Weird ""Col"" Näme\t" text, "select" int,
            c_int8_arr int8[], c_bytea_arr bytea[]
        );
        INSERT INTO torture VALUES (
            1, 12, 123456, 1234567890123, 4242, true,
            1.5, 3.141592653589793, 123.456, 66.52,
            'plain text', 'varchar', 'ab', 'a_name', 'x',
            '{ "a" : [1, 2 ], "b": "c" }', '{"b": [1, {"c": null}], "a": "x\"y", "n": 1.50, "t": true, "f": false}',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2024-02-29', '2024-01-01 12:34:56.789', '2024-06-30 23:59:59.999999+02', '2024-01-01 00:00:00.1239',
            '12:34:56.5', '12:34:56+05:30', '1 year 2 mons 3 days 04:05:06.7',
            '\x0102ff', 12.34, B'1010', B'101',
            '192.168.1.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
            '(1.5,2)', '((0,0),(1,1))', '<(1,2),3>', '[(0,0),(1,1),(2,0)]',
            'a fat cat sat', 'fat & (rat | cat)', {XML},
            '[1,10)', '["2024-01-01 00:00:00+00","2024-12-31 00:00:00+00")',
            'happy "quoted"', 'b',
            ROW(7, ROW(1, 'in"ner', '2024-01-01 00:00:00+00')::inner_t, '{a,NULL,"c d"}',
                ARRAY[ROW(2, NULL, NULL)::inner_t, NULL])::outer_t,
            '{1,2,3}', '{"a","b\"c",NULL,"","é漢🎉"}', '{{1,2},{3,NULL}}', '{{{a,b}},{{c,d}}}',
            ARRAY[ROW(1, NULL, '{}', '{}')::outer_t],
            5, '{4,5,NULL}', 'short',
            '{1.5,NaN,-Infinity,-0,1e300}', '{1.10,NaN,-Infinity,0.000001}', '{2024-01-01,infinity,NULL}',
            '{"2024-01-01 00:00:00+00",-infinity}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}', '{t,f,NULL}',
            ARRAY['{"k": [1, 2]}'::jsonb, 'null'::jsonb, '"s"'::jsonb, '3.0'::jsonb, NULL],
            ARRAY['{"k" : 1}'::json, NULL], '{ok,sad}', '[0:2]={7,8,9}', '{1,-32768,32767}', '{0,4294967295}',
            'weird', 1,
            '{{9007199254740993,NULL},{-9223372036854775808,0}}', ARRAY['\x00ff10'::bytea, NULL, '', '\x61626364']
        );
        INSERT INTO torture (id) VALUES (2);
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval)
        VALUES
          (3, -32768, -2147483648, -9223372036854775808, 0, false, 'NaN', 'NaN', 'NaN',
           E'\x01\x02\x03\x04\x05\x06\x07\x08\t\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f "\\ / \x7f',
           '', '"just a string"', '"just a string with \u0001 and \" and é \\ done"', 'infinity', 'infinity', 'infinity',
           '{}', '{}', '{}', '{}', '{}', '-178000000 years');
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (4, 32767, 2147483647, 9223372036854775807, 4294967295, NULL, 'Infinity', 'Infinity', 'Infinity',
           'ünïcödé 漢字 😀 🇫🇷 \u00e9', 'abcde', '[]', '[]', '-infinity', '-infinity', '-infinity',
           '{NULL}', '{NULL,NULL}', '{{NULL}}', '{NaN}', '{NULL}', '-1 day -00:00:00.000001');
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (5, 0, 0, 0, 1, true, '-Infinity', '-Infinity', '-Infinity',
           'tab	inside', 'x', 'null', 'null', '4713-01-01 BC', '4713-01-01 00:00:00 BC', '0001-01-01 00:00:00+00 BC',
           '{0}', '{""}', '{{1},{2}}', '{-0}', '{"{}","[]"}', '0');
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (6, 1, 1, 1, 2, false, '-0', '-0', '-0.000',
           'x', 'y', '123', '123.4500', '0001-01-01', '2000-01-01 00:00:00.000001', '1999-12-31 23:59:59.5+00',
           NULL, NULL, NULL, NULL, NULL, NULL);
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (7, NULL, NULL, NULL, NULL, NULL, '1e-45', '5e-324', '12345678901234567890.12345678901234567890123456789',
           NULL, NULL, 'true', '{"deep": {"deeper": {"deepest": [[[]], {}, [{}]]}}}', '294276-12-31', '294276-12-31 23:59:59.999999', '294276-12-31 23:59:59.999999+00',
           NULL, NULL, NULL, NULL, NULL, NULL);
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (8, NULL, NULL, NULL, NULL, NULL, '3.4028235e+38', '1.7976931348623157e+308', '0.000000000000000000001',
           NULL, NULL, NULL, '{"a": 1e-7, "b": 1e20, "c": -0.0, "d": 100}', NULL, NULL, NULL,
           NULL, NULL, NULL, '{1e-5,123456789012345678,0.1,100}', NULL, NULL);
        INSERT INTO torture (id, c_int2, c_int4, c_int8, c_oid, c_bool, c_float4, c_float8, c_numeric,
                             c_text, c_bpchar, c_json, c_jsonb, c_date, c_timestamp, c_timestamptz,
                             c_int_arr, c_text_arr, c_2d, c_float8_arr, c_jsonb_arr, c_interval) VALUES
          (9, NULL, NULL, NULL, NULL, NULL, '0.1', '0.1', '1e100',
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '{1.0000000000000002,2.2250738585072014e-308}', NULL, NULL);
        -- Toasted values: over 1 MB, compressible and not.
        INSERT INTO torture (id, c_text, c_jsonb, c_int_arr, c_text_arr, c_bytea)
        SELECT 10, repeat(E'abc"\\é\n', 300000),
               (SELECT jsonb_agg(g) FROM generate_series(1, 50000) g),
               (SELECT array_agg(g) FROM generate_series(1, 300000) g),
               ARRAY[repeat('x', 100000), NULL, repeat('é', 50000)],
               decode(repeat('00ff', 1000), 'hex');
        INSERT INTO torture (id, c_text, c_json)
        SELECT 11, string_agg(md5(g::text), '' ORDER BY g),
               ('{"big": "' || string_agg(md5(g::text), '' ORDER BY g) || '"}')::json
        FROM generate_series(1, 40000) g;
    "#;

    const TORTURE: &str = "SELECT * FROM torture ORDER BY id";

    /// The torture table, for the suites of other features.
    pub fn create_torture_table() {
        setup();
    }

    /// Create the torture table. An xml value needs a server built with
    /// libxml (the PostgreSQL 18 build the tests use has none): without it
    /// the xml column holds NULL and the difference is stated, not hidden.
    fn setup() {
        let libxml: bool = Spi::get_one(
            "SELECT setting LIKE '%--with-libxml%' FROM pg_config WHERE name = 'CONFIGURE'",
        )
        .unwrap()
        .unwrap_or(false);
        let xml = if libxml {
            r#"'<a href="x">y &amp; z</a>'"#
        } else {
            "NULL"
        };
        Spi::run(&SETUP.replace("{XML}", xml)).unwrap();
    }

    #[pg_test]
    fn torture_table_matches_row_to_json_under_many_settings() {
        setup();
        let column_types: Option<i64> =
            Spi::get_one("SELECT count(DISTINCT atttypid) FROM pg_attribute WHERE attrelid = 'torture'::regclass AND attnum > 0")
                .unwrap();
        assert!(
            column_types.unwrap() >= 40,
            "the torture table has {column_types:?} distinct types"
        );
        let settings = [
            ("UTC", "ISO, MDY", 1),
            ("UTC", "ISO, MDY", 0),
            ("America/New_York", "SQL, DMY", 1),
            ("Asia/Kolkata", "German", 0),
            ("Australia/Lord_Howe", "Postgres, MDY", 3),
            ("<+0530>-05:30", "ISO, YMD", -15),
            ("Europe/Amsterdam", "ISO, DMY", 1),
        ];
        for (zone, datestyle, float_digits) in settings {
            Spi::run(&format!(
                "SET TimeZone = '{zone}'; SET DateStyle = '{datestyle}'; SET extra_float_digits = {float_digits};
                 SET IntervalStyle = 'postgres_verbose'"
            ))
            .unwrap();
            assert_eq!(
                assert_matches_oracle(TORTURE),
                11,
                "under {zone} / {datestyle} / {float_digits}"
            );
        }
    }

    #[pg_test]
    fn records_and_query_shapes_match() {
        setup();
        for query in [
            "SELECT ROW(1, 'a', NULL) AS r, ROW(ROW(2, 'b'), ARRAY[ROW(3)]) AS nested",
            "SELECT 1 AS a, 2 AS a, 'x' AS \"?column?\"",
            "SELECT 1, 'unnamed'",
            "VALUES (1, 'v'), (2, NULL)",
            "TABLE torture",
            "SELECT c_outer, c_outer_arr FROM torture",
            "SELECT (c_outer).inner_v FROM torture",
            "SELECT ARRAY[ROW(1,'x'), ROW(2,'y')] AS recs",
            "SELECT '{}'::int[] AS empty, ARRAY[]::text[] AS empty_text",
            "SELECT g AS n FROM generate_series(1, 0) g",
            "SELECT",
            "SELECT 1 AS only WHERE false",
        ] {
            assert_matches_oracle(query);
        }
    }

    #[pg_test]
    fn dropped_columns_are_skipped() {
        Spi::run(
            "CREATE TABLE dropped (a int, b text, c int);
             INSERT INTO dropped VALUES (1, 'x', 3);
             ALTER TABLE dropped DROP COLUMN b;
             ALTER TABLE dropped ADD COLUMN d text DEFAULT 'new';",
        )
        .unwrap();
        assert_matches_oracle("SELECT * FROM dropped");
        let line: Option<String> = Spi::get_one("SELECT stream_export('dropped')").unwrap();
        assert_eq!(line.as_deref(), Some("{\"a\":1,\"c\":3,\"d\":\"new\"}"));
    }

    /// A seeded generator of random rows of the fast-path types, including
    /// random Unicode text, compared with the oracle over 12,000 rows.
    #[pg_test]
    fn randomized_fast_path_rows_match() {
        Spi::run(
            r#"
            SELECT setseed(0.4242);
            CREATE FUNCTION random_text(n int) RETURNS text LANGUAGE sql VOLATILE AS $$
                SELECT string_agg(
                    CASE WHEN r < 0.5 THEN chr(32 + (random() * 94)::int)
                         WHEN r < 0.6 THEN chr(1 + (random() * 31)::int)
                         WHEN r < 0.7 THEN (ARRAY['"', '\', '/', E'\n'])[1 + (random() * 3)::int]
                         WHEN r < 0.85 THEN chr(160 + (random() * 1800)::int)
                         WHEN r < 0.95 THEN chr(19968 + (random() * 20000)::int)
                         ELSE chr(127744 + (random() * 1000)::int) END, '')
                FROM (SELECT random() AS r FROM generate_series(1, n)) s
            $$;
            CREATE TABLE random_rows AS
            SELECT g AS id,
                   (random() * 65535 - 32768)::int2 AS i2,
                   (random() * 4294967295 - 2147483648)::int8::int4 AS i4,
                   ((random() - 0.5) * 9.2e18)::int8 AS i8,
                   (random() * 4294967295)::int8::oid AS o,
                   random() < 0.5 AS b,
                   ((random() - 0.5) * 10 ^ (random() * 60 - 30))::float4 AS f4,
                   ((random() - 0.5) * 10 ^ (random() * 600 - 300)) AS f8,
                   round(((random() - 0.5) * 10 ^ (random() * 40 - 10))::numeric, (random() * 20)::int) AS num,
                   random_text((random() * 40)::int) AS t,
                   random_text((random() * 8)::int)::varchar AS vc,
                   CASE WHEN random() < 0.1 THEN NULL ELSE gen_random_uuid() END AS u,
                   date '2000-01-01' + ((random() - 0.5) * 2000000)::int AS d,
                   timestamp '2000-01-01' + (random() - 0.5) * interval '500000 days' AS ts,
                   timestamptz '2000-01-01 00:00:00+00' + (random() - 0.5) * interval '200000 days' AS tstz,
                   jsonb_build_object(random_text(3), random_text(5), 'n', round((random() * 1000)::numeric, 3),
                                      'a', jsonb_build_array(random() < 0.5, NULL, random_text(2))) AS jb,
                   to_json(random_text(4)) AS js,
                   ARRAY[(random() * 1000)::int, NULL, (random() * -1000)::int] AS ia,
                   ARRAY[random_text(3), random_text(0)] AS ta,
                   ARRAY[random() * 1e10, -random()] AS fa
            FROM generate_series(1, 12000) g;
            "#,
        )
        .unwrap();
        for zone in ["UTC", "Pacific/Chatham"] {
            for float_digits in [1, 0] {
                Spi::run(&format!(
                    "SET TimeZone = '{zone}'; SET extra_float_digits = {float_digits}"
                ))
                .unwrap();
                assert_eq!(
                    assert_matches_oracle("SELECT * FROM random_rows ORDER BY id"),
                    12000
                );
            }
        }
    }
}

//! The JSON type options against what PostgreSQL computes for the same
//! values: every line must equal an oracle built in SQL from the row's
//! columns, with each affected value cast or formatted by PostgreSQL
//! itself (`::text`, `encode(..., 'base64')`, `to_json` under UTC), inside
//! arrays and composites too. The oracle is checked against `row_to_json`
//! first, with every option off.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[derive(Clone, Copy, Default, Debug)]
    struct Style {
        bigint: bool,
        numeric: bool,
        utc: bool,
        base64: bool,
        omit_nulls: bool,
    }

    impl Style {
        /// The named arguments of `stream_export` for this style.
        fn arguments(&self) -> String {
            [
                ("bigint_as_string", self.bigint),
                ("numeric_as_string", self.numeric),
                ("timestamptz_utc", self.utc),
                ("bytea_base64", self.base64),
                ("omit_nulls", self.omit_nulls),
            ]
            .iter()
            .map(|(name, on)| format!(", {name} => {on}"))
            .collect()
        }
    }

    struct TypeInfo {
        typtype: String,
        category: String,
        base: u32,
        element: u32,
        relid: u32,
        name: String,
    }

    fn type_info(typid: u32) -> TypeInfo {
        Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT typtype::text, typcategory::text, typbasetype::int8, typelem::int8,
                            typrelid::int8, format_type(oid, NULL)
                     FROM pg_type WHERE oid = $1::int8::oid",
                    Some(1),
                    &[(typid as i64).into()],
                )
                .unwrap()
                .first();
            TypeInfo {
                typtype: row.get::<String>(1).unwrap().unwrap(),
                category: row.get::<String>(2).unwrap().unwrap(),
                base: row.get::<i64>(3).unwrap().unwrap() as u32,
                element: row.get::<i64>(4).unwrap().unwrap() as u32,
                relid: row.get::<i64>(5).unwrap().unwrap() as u32,
                name: row.get::<String>(6).unwrap().unwrap(),
            }
        })
    }

    const INT8: u32 = 20;
    const NUMERIC: u32 = 1700;
    const TIMESTAMPTZ: u32 = 1184;
    const BYTEA: u32 = 17;

    /// (quoted name, name, type) of each attribute of a relation or
    /// composite type.
    fn fields(relid: u32) -> Vec<(String, String, u32)> {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT quote_ident(attname::text), attname::text, atttypid::int8 FROM pg_attribute
                     WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                    None,
                    &[(relid as i64).into()],
                )
                .unwrap()
                .map(|row| {
                    (
                        row.get::<String>(1).unwrap().unwrap(),
                        row.get::<String>(2).unwrap().unwrap(),
                        row.get::<i64>(3).unwrap().unwrap() as u32,
                    )
                })
                .collect()
        })
    }

    /// Whether the style changes how values of `typid` render.
    fn changes(typid: u32, style: &Style) -> bool {
        match typid {
            INT8 => return style.bigint,
            NUMERIC => return style.numeric,
            TIMESTAMPTZ => return style.utc,
            BYTEA => return style.base64,
            _ => {}
        }
        let info = type_info(typid);
        match info.typtype.as_str() {
            "d" => changes(info.base, style),
            "c" => fields(info.relid)
                .iter()
                .any(|(_, _, t)| changes(*t, style)),
            _ if info.category == "A" => changes(info.element, style),
            _ => false,
        }
    }

    /// A json-valued SQL expression whose text is what the export must
    /// write for `expr`, a value of type `typid`, in the same session.
    fn expected(expr: &str, typid: u32, style: &Style) -> String {
        if !changes(typid, style) {
            return format!("to_json({expr})");
        }
        match typid {
            INT8 | NUMERIC => return format!("to_json(({expr})::text)"),
            // The UTC wall-clock time as a timestamp, then Z before any era.
            TIMESTAMPTZ => {
                return format!(
                    "CASE WHEN isfinite({expr}) THEN to_json(regexp_replace(
                        to_json(({expr}) AT TIME ZONE 'UTC') #>> '{{}}', '( BC)?$', 'Z\\1'))
                     ELSE to_json({expr}) END"
                )
            }
            BYTEA => return format!("to_json(translate(encode({expr}, 'base64'), E'\\n', ''))"),
            _ => {}
        }
        let info = type_info(typid);
        if info.typtype == "d" {
            let base = type_info(info.base);
            return expected(&format!("({expr})::{}", base.name), info.base, style);
        }
        if info.typtype == "c" {
            let mirror = format!("json_mirror_{typid}");
            let fields = fields(info.relid);
            let exists: bool = Spi::get_one(&format!("SELECT to_regtype('{mirror}') IS NOT NULL"))
                .unwrap()
                .unwrap();
            if !exists {
                let columns: Vec<String> = fields
                    .iter()
                    .map(|(name, _, _)| format!("{name} json"))
                    .collect();
                Spi::run(&format!("CREATE TYPE {mirror} AS ({})", columns.join(", "))).unwrap();
            }
            let values: Vec<String> = fields
                .iter()
                .map(|(name, _, t)| expected(&format!("({expr}).{name}"), *t, style))
                .collect();
            return format!(
                "CASE WHEN to_json({expr}) IS NULL THEN NULL ELSE to_json(ROW({})::{mirror}) END",
                values.join(", ")
            );
        }
        // An array whose elements change: int8 and numeric through text[]
        // (any dimensions); others element by element (one dimension).
        match info.element {
            INT8 | NUMERIC => format!("to_json(({expr})::text[])"),
            element => format!(
                "CASE WHEN ({expr}) IS NULL THEN NULL ELSE array_to_json(ARRAY(
                    SELECT {} FROM generate_subscripts({expr}, 1) AS g(i) ORDER BY i)) END",
                expected(&format!("({expr})[g.i]"), element, style)
            ),
        }
    }

    /// The oracle's lines for `table` (ordered by id) under `style`.
    fn oracle(table: &str, style: &Style) -> Vec<String> {
        let relid: i64 = Spi::get_one(&format!("SELECT '{table}'::regclass::oid::int8"))
            .unwrap()
            .unwrap();
        let columns = fields(relid as u32);
        let sql = if style.omit_nulls {
            let parts: Vec<String> = columns
                .iter()
                .map(|(name, raw, t)| {
                    let key = raw.replace('\'', "''");
                    let value = expected(&format!("s.{name}"), *t, style);
                    format!(
                        "CASE WHEN to_json(s.{name}) IS NOT NULL THEN to_json('{key}'::text)::text || ':' || ({value})::text END"
                    )
                })
                .collect();
            format!(
                "SELECT '{{' || coalesce(concat_ws(',', {}), '') || '}}' FROM {table} s ORDER BY s.id",
                parts.join(", ")
            )
        } else {
            let parts: Vec<String> = columns
                .iter()
                .map(|(name, _, t)| {
                    format!("{} AS {name}", expected(&format!("s.{name}"), *t, style))
                })
                .collect();
            format!(
                "SELECT row_to_json(o)::text FROM (SELECT {} FROM {table} s ORDER BY s.id) o",
                parts.join(", ")
            )
        };
        crate::pgrx_tests::support::lines(&sql)
    }

    fn exported(table: &str, style: &Style) -> Vec<String> {
        crate::pgrx_tests::support::lines(&format!(
            "SELECT stream_export('SELECT * FROM {table} ORDER BY id'{})",
            style.arguments()
        ))
    }

    fn assert_same(table: &str, style: &Style, zone: &str) {
        Spi::run(&format!("SET TimeZone = '{zone}'")).unwrap();
        let got = exported(table, style);
        let want = oracle(table, style);
        assert_eq!(got.len(), want.len(), "{table} {style:?} under {zone}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                let cut = |s: &str| s.chars().take(3000).collect::<String>();
                panic!(
                    "{table} row {i} {style:?} under {zone}\n got: {}\nwant: {}",
                    cut(g),
                    cut(w)
                );
            }
        }
    }

    fn styles() -> Vec<Style> {
        let one = |f: fn(&mut Style)| {
            let mut s = Style::default();
            f(&mut s);
            s
        };
        vec![
            one(|s| s.bigint = true),
            one(|s| s.numeric = true),
            one(|s| s.utc = true),
            one(|s| s.base64 = true),
            one(|s| s.omit_nulls = true),
            Style {
                bigint: true,
                numeric: true,
                utc: true,
                base64: true,
                omit_nulls: true,
            },
        ]
    }

    #[pg_test]
    fn the_oracle_is_row_to_json_with_every_option_off() {
        crate::pgrx_tests::encoding::tests::create_torture_table();
        Spi::run("SET TimeZone = 'UTC'").unwrap();
        let plain = crate::pgrx_tests::support::lines(
            "SELECT row_to_json(t)::text FROM torture t ORDER BY id",
        );
        assert_eq!(oracle("torture", &Style::default()), plain);
        assert_eq!(exported("torture", &Style::default()), plain);
    }

    #[pg_test]
    fn torture_table_matches_under_every_option() {
        crate::pgrx_tests::encoding::tests::create_torture_table();
        for zone in ["UTC", "America/New_York", "Asia/Kolkata", "<+0530>-05:30"] {
            for style in styles() {
                assert_same("torture", &style, zone);
            }
        }
    }

    /// Seeded random values of the affected types, inside arrays and
    /// composites too.
    #[pg_test]
    fn randomized_rows_match_under_every_option() {
        Spi::run(
            r#"
            SELECT setseed(0.1717);
            CREATE TYPE money_parts AS (amount numeric, big int8, raw bytea, at timestamptz, bigs int8[]);
            CREATE TABLE random_options AS
            SELECT g AS id,
                   CASE WHEN random() < 0.1 THEN NULL ELSE ((random() - 0.5) * 1.8e19)::numeric::int8 END AS i8,
                   CASE WHEN random() < 0.05 THEN 'NaN'::numeric
                        WHEN random() < 0.05 THEN NULL
                        ELSE round(((random() - 0.5) * 10 ^ (random() * 40 - 10))::numeric, (random() * 20)::int) END AS num,
                   CASE WHEN random() < 0.05 THEN 'infinity'::timestamptz
                        ELSE timestamptz '2000-01-01 00:00:00+00' + (random() - 0.5) * interval '2000000 days' END AS tstz,
                   CASE WHEN random() < 0.1 THEN NULL
                        ELSE decode(substr(md5(g::text) || md5((g * 7)::text), 1, 2 * (random() * 32)::int), 'hex') END AS raw,
                   ARRAY[[(random() * 1e18)::int8, NULL], [-(random() * 1e18)::int8, g]] AS i8_2d,
                   ARRAY[round((random() * 1e6)::numeric, 3), NULL, 'NaN'] AS nums,
                   ARRAY[timestamptz '2024-01-01 00:00:00.5+00' + g * interval '1 hour 0.001 sec', NULL] AS stamps,
                   ARRAY[decode(md5(g::text), 'hex'), NULL, ''::bytea] AS raws,
                   ROW(round((random() * 1e9)::numeric, 2), (random() * 1e18)::int8, decode(md5(g::text), 'hex'),
                       timestamptz '1999-12-31 23:59:59.999+00' + g * interval '1 sec',
                       ARRAY[g::int8, NULL])::money_parts AS parts,
                   ARRAY[ROW(1.5, 2, '\x00ff', '2024-02-29 12:00:00+05', '{3}')::money_parts, NULL] AS parts_arr,
                   jsonb_build_object('big', 9007199254740993, 'n', 1.50) AS jb
            FROM generate_series(1, 3000) g;
            "#,
        )
        .unwrap();
        for zone in ["UTC", "Pacific/Chatham", "America/St_Johns"] {
            for style in styles() {
                assert_same("random_options", &style, zone);
            }
        }
    }

    #[pg_test]
    fn profile_javascript_is_the_four_type_options() {
        crate::pgrx_tests::encoding::tests::create_torture_table();
        let profile = crate::pgrx_tests::support::lines(
            "SELECT stream_export('SELECT * FROM torture ORDER BY id', profile => 'javascript')",
        );
        let spelled = exported(
            "torture",
            &Style {
                bigint: true,
                numeric: true,
                utc: true,
                base64: true,
                omit_nulls: false,
            },
        );
        assert_eq!(profile, spelled);
        // An option spelled out wins over the profile.
        let without_numeric = crate::pgrx_tests::support::lines(
            "SELECT stream_export('SELECT * FROM torture ORDER BY id', profile => 'javascript', numeric_as_string => false)",
        );
        let want = exported(
            "torture",
            &Style {
                bigint: true,
                numeric: false,
                utc: true,
                base64: true,
                omit_nulls: false,
            },
        );
        assert_eq!(without_numeric, want);
        assert_eq!(
            crate::pgrx_tests::support::sqlstate_of(
                "SELECT stream_export('torture', profile => 'java')"
            ),
            "22023"
        );
    }
}

//! Helpers shared by the in-database test suites.

use pgrx::prelude::*;

/// Run `statement` and return its SQLSTATE ("ok" when it succeeds), through
/// a PL/pgSQL helper that catches the error in a subtransaction.
pub fn sqlstate_of(statement: &str) -> String {
    let exists: Option<bool> =
        Spi::get_one("SELECT to_regproc('pse_sqlstate') IS NOT NULL").unwrap();
    if exists != Some(true) {
        Spi::run(
            "CREATE FUNCTION pse_sqlstate(stmt text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE stmt; RETURN 'ok';
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
             GRANT EXECUTE ON FUNCTION pse_sqlstate(text) TO PUBLIC;",
        )
        .unwrap();
    }
    Spi::get_one_with_args::<String>("SELECT pse_sqlstate($1)", &[statement.into()])
        .unwrap()
        .unwrap()
}

/// The values of a one-column query, in order.
pub fn lines(sql: &str) -> Vec<String> {
    Spi::get_one::<Vec<String>>(&format!(
        "SELECT coalesce(array_agg(l), '{{}}') FROM ({sql}) s(l)"
    ))
    .unwrap()
    .unwrap()
}

/// A table `items (id int PRIMARY KEY, name text NOT NULL)` with `n` rows
/// inserted in random order.
pub fn make_items(n: i32) {
    Spi::run(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g || E' \"q\" \\\\ é' FROM generate_series(1, {n}) g ORDER BY random();"
    ))
    .unwrap();
}

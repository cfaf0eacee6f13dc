//! What an export reads: the source (a relation or a query, [`source`]),
//! its partition bounds ([`plan`]), the cursor or keyset walk ([`scan`]),
//! and the export that walks it and encodes each row ([`export`]).

pub mod export;
pub mod plan;
pub mod scan;
pub mod source;

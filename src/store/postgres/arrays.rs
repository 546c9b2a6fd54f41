//! Rows sent to PostgreSQL as array parameters: a statement takes a batch
//! of rows as one array per column, and `unnest` turns them back into rows.
//! [`row_arrays!`] declares a row type and its arrays from one list of
//! columns with their PostgreSQL types, so that a row's fields, its arrays,
//! the `$n::type[]` placeholders and the column names in the statement's
//! text always agree: a new column is one line there and one field where
//! rows are built, which the compiler checks. Depends only on the
//! `postgres` crate.

use postgres::types::ToSql;

/// A statement parameter.
pub(super) type Param<'a> = &'a (dyn ToSql + Sync);

/// Numbers a statement's parameters in order.
#[derive(Debug)]
pub(super) struct Placeholders {
    last: usize,
}

impl Placeholders {
    /// The placeholders after the statement's first `n`, which its text
    /// writes by hand.
    pub(super) fn after(n: usize) -> Self {
        Placeholders { last: n }
    }

    fn next(&mut self) -> usize {
        self.last += 1;
        self.last
    }
}

/// A batch of one table's rows as column arrays (see [`row_arrays!`]).
pub(super) trait Arrays {
    /// The names of the arrays, in order: the table's columns that the rows
    /// hold as they are, then the fields the statement computes columns
    /// from.
    fn fields(&self) -> &'static [&'static str];

    /// The arrays' element types in PostgreSQL, in the order of
    /// [`Arrays::fields`].
    fn types(&self) -> &'static [&'static str];

    /// How many rows.
    fn rows(&self) -> usize;

    /// Appends the arrays to `params`, in the order of [`Arrays::fields`].
    fn params<'s>(&'s self, params: &mut Vec<Param<'s>>);

    /// `unnest($n::type[], ..)` over the arrays, numbered on from `p`.
    fn unnest(&self, p: &mut Placeholders) -> String {
        let arrays: Vec<String> = self
            .types()
            .iter()
            .map(|ty| format!("${}::{ty}[]", p.next()))
            .collect();
        format!("unnest({})", arrays.join(", "))
    }
}

/// `columns` qualified by `alias` (`alias.a, alias.b`), or bare when
/// `alias` is empty.
pub(super) fn list(alias: &str, columns: &[&str]) -> String {
    let qualified: Vec<String> = columns
        .iter()
        .map(|column| match alias {
            "" => (*column).to_string(),
            _ => format!("{alias}.{column}"),
        })
        .collect();
    qualified.join(", ")
}

/// `column = alias.column` for each of `columns` but `key`.
pub(super) fn assignments(alias: &str, columns: &[&str], key: &str) -> String {
    let assigned: Vec<String> = columns
        .iter()
        .filter(|column| **column != key)
        .map(|column| format!("{column} = {alias}.{column}"))
        .collect();
    assigned.join(", ")
}

/// Declares a row type, with one field per column (`name: Type =
/// "pgtype"`), and its arrays type, a batch of such rows as one `Vec` per
/// column that implements [`Arrays`]. The fields after `computed` are not
/// columns of the table: the statement computes columns from them.
/// `ARRAYS::COLUMNS` lists the table's columns.
macro_rules! row_arrays {
    (
        $(#[$row_doc:meta])*
        struct $row:ident<$a:lifetime>, arrays $arrays:ident {
            $( $(#[$doc:meta])* $field:ident: $ty:ty = $pg:literal, )+
        }
        $( computed {
            $( $(#[$xdoc:meta])* $xfield:ident: $xty:ty = $xpg:literal, )+
        } )?
    ) => {
        $(#[$row_doc])*
        pub(super) struct $row<$a> {
            $( $(#[$doc])* pub $field: $ty, )+
            $($( $(#[$xdoc])* pub $xfield: $xty, )+)?
        }

        #[doc = concat!("A batch of [`", stringify!($row), "`] as column arrays.")]
        #[derive(Default)]
        pub(super) struct $arrays<$a> {
            rows: usize,
            $( $field: Vec<$ty>, )+
            $($( $xfield: Vec<$xty>, )+)?
        }

        impl<$a> $arrays<$a> {
            /// The table's columns that the rows hold, in order.
            pub(super) const COLUMNS: &'static [&'static str] = &[$(stringify!($field)),+];

            /// Adds a row.
            pub(super) fn push(&mut self, row: $row<$a>) {
                self.rows += 1;
                $( self.$field.push(row.$field); )+
                $($( self.$xfield.push(row.$xfield); )+)?
            }
        }

        impl $crate::store::postgres::arrays::Arrays for $arrays<'_> {
            fn fields(&self) -> &'static [&'static str] {
                &[$(stringify!($field),)+ $($(stringify!($xfield),)+)?]
            }

            fn types(&self) -> &'static [&'static str] {
                &[$($pg,)+ $($($xpg,)+)?]
            }

            fn rows(&self) -> usize {
                self.rows
            }

            fn params<'s>(
                &'s self,
                params: &mut Vec<$crate::store::postgres::arrays::Param<'s>>,
            ) {
                $( params.push(&self.$field); )+
                $($( params.push(&self.$xfield); )+)?
            }
        }
    };
}

pub(super) use row_arrays;

#[cfg(test)]
mod tests {
    use super::{Arrays, Placeholders, assignments, list};

    row_arrays! {
        /// A row of a test table.
        struct Pair<'a>, arrays Pairs {
            key: &'a str = "text",
            value: i64 = "bigint",
        }
        computed {
            offset: i64 = "bigint",
        }
    }

    #[test]
    fn arrays_number_their_placeholders_in_field_order() {
        let mut pairs = Pairs::default();
        pairs.push(Pair {
            key: "a",
            value: 1,
            offset: 7,
        });
        let mut p = Placeholders::after(2);
        assert_eq!(
            pairs.unnest(&mut p),
            "unnest($3::text[], $4::bigint[], $5::bigint[])"
        );
        assert_eq!(
            pairs.unnest(&mut p),
            "unnest($6::text[], $7::bigint[], $8::bigint[])"
        );
        assert_eq!(pairs.fields(), ["key", "value", "offset"]);
        let mut params = Vec::new();
        pairs.params(&mut params);
        assert_eq!((params.len(), pairs.rows()), (3, 1));
        assert_eq!(Pairs::COLUMNS, ["key", "value"]);
        assert_eq!(list("x", Pairs::COLUMNS), "x.key, x.value");
        assert_eq!(assignments("x", Pairs::COLUMNS, "key"), "value = x.value");
    }
}

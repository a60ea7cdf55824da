# Native vs VMM cycles per op (log scale), from bench/results.csv (see bench/run.sh).
# Columns: op,iterations,native,vmm_flush,vmm_cached,...
set datafile separator ','
set terminal pngcairo size 1400,700 font ',10'
set output png
set title 'Cycles per operation under -icount (= instructions): native vs trap-and-emulate VMM'
set logscale y
set ylabel 'instructions per op (log)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set xtics rotate by -40 noenhanced
set key top left
set grid ytics
set yrange [0.5:*]
plot csv using ($3 < 1 ? 1 : $3):xtic(1) every ::1 title 'native', \
     '' using ($4 < 1 ? 1 : $4) every ::1 title 'VMM, shadow=flush', \
     '' using ($5 < 1 ? 1 : $5) every ::1 title 'VMM, shadow=cached'
